"""Pure attention functions shared by every attention layer.

`dot_product_attention(q, k, v, ...)` is exact multi-head scaled dot-product
attention on per-head arrays:

  q (*batch, lq, h, dk), k (*batch, lk, h, dk), v (*batch, lk, h, dv)
  -> (*batch, lq, h, dv)

`*batch` is any number of leading axes (usually just b; LSH attention adds a
chunk axis). Logits and the softmax are computed in float32 whatever the input
dtype; the output has `v`'s dtype. A query may attend to a key when the
optional boolean `mask` (broadcastable to (*batch, h, lq, lk), True = may
attend) allows it and, with `causal=True`, when the key's position is not
after the query's. A query that may attend to no key gets a zero output.
With `q_segment_ids`/`k_segment_ids` (int (*batch, lq) / (*batch, lk), a
packed row's document ids) a query attends only to keys of its own document;
no (lq, lk) mask is built for them, so chunking stays linear in memory.

With `chunk_len`, queries are processed `chunk_len` at a time in a `lax.scan`
whose body is rematerialised (`jax.checkpoint`), so neither the forward nor the
backward pass ever holds the (lq, lk) logits at once: compiled temporary
memory is linear in the length. The result is the same as the unchunked one
(up to float32 rounding), gradients included.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Kept finite so that a fully masked row gives exp(0) terms (then zeroed), not NaN.
_MASKED = -1e30


class AttentionOutput(NamedTuple):
  """Everything `dot_product_attention(..., return_details=True)` computes.

  out: (*batch, lq, h, dv). logsumexp: (*batch, h, lq) float32, the log of
  the softmax normaliser over the keys a query may see (-1e30 when it may see
  none); LSH attention combines hash rounds with it. weights:
  (*batch, h, lq, lk) float32 attention probabilities after masking (before
  dropout), or None unless `return_weights=True`.
  """

  out: jax.Array
  logsumexp: jax.Array
  weights: jax.Array | None


def padding_mask(mask):
  """(b, lk) bool, True = real token -> (b, 1, 1, lk): keys a query may attend to."""
  return mask[:, None, None, :]


def causal_mask(q_positions, k_positions):
  """(..., lq), (..., lk) int positions -> (..., lq, lk): key position <= query position."""
  return k_positions[..., None, :] <= q_positions[..., :, None]


def _check_shapes(q, k, v):
  if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
    raise ValueError(
        'dot_product_attention needs q (*batch, lq, h, dk), k (*batch, lk, h, dk) and '
        f'v (*batch, lk, h, dv) of one rank >= 3, got q {tuple(q.shape)}, k {tuple(k.shape)}, '
        f'v {tuple(v.shape)}.')
  if q.shape[-1] != k.shape[-1] or q.shape[-2] != k.shape[-2] or k.shape[:-1] != v.shape[:-1]:
    raise ValueError(
        'dot_product_attention: q and k need the same heads and width (h, dk), and k and v the '
        f'same leading axes (*batch, lk, h), got q {tuple(q.shape)}, k {tuple(k.shape)}, '
        f'v {tuple(v.shape)}.')


def _full_mask(mask, ndim):
  """`mask` reshaped (not broadcast) to rank `ndim` by adding leading unit axes."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f'mask must be boolean (True = may attend), got {mask.dtype}.')
  if mask.ndim > ndim:
    raise ValueError(f'mask of shape {tuple(mask.shape)} has more than {ndim} axes '
                     '(*batch, h, lq, lk).')
  return jnp.reshape(mask, (1,) * (ndim - mask.ndim) + mask.shape)


def _positions(positions, length, batch_shape, what):
  """Positions as int32 (*batch, length); `arange(length)` when None."""
  if positions is None:
    positions = jnp.arange(length, dtype=jnp.int32)
  positions = jnp.asarray(positions, jnp.int32)
  if positions.shape[-1:] != (length,):
    raise ValueError(f'{what} must end in the length axis ({length},), got shape '
                     f'{tuple(positions.shape)}.')
  positions = jnp.reshape(positions, (1,) * (len(batch_shape) + 1 - positions.ndim) + positions.shape)
  return jnp.broadcast_to(positions, batch_shape + (length,))


def segment_mask(q_segment_ids, k_segment_ids):
  """(*batch, lq), (*batch, lk) int -> (*batch, 1, lq, lk): the key is in the query's document."""
  return (q_segment_ids[..., None, :, None] == k_segment_ids[..., None, None, :])


def _attend(q, k, v, mask, q_positions, k_positions, causal, scale, dropout_rate, dropout_rng,
            return_weights, q_segment_ids=None, k_segment_ids=None):
  """Unchunked attention; mask already of full rank (or None); positions (*batch, l)."""
  logits = jnp.einsum('...qhd,...khd->...hqk', q, k, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(scale)
  allowed = None
  if causal:
    allowed = causal_mask(q_positions, k_positions)[..., None, :, :]
  if q_segment_ids is not None:
    same = segment_mask(q_segment_ids, k_segment_ids)
    allowed = same if allowed is None else jnp.logical_and(allowed, same)
  if mask is not None:
    allowed = mask if allowed is None else jnp.logical_and(allowed, mask)
  if allowed is not None:
    allowed = jnp.broadcast_to(allowed, logits.shape)
    logits = jnp.where(allowed, logits, _MASKED)
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  exp = jnp.exp(logits - peak)
  if allowed is not None:
    exp = jnp.where(allowed, exp, 0.0)
  total = jnp.sum(exp, axis=-1, keepdims=True)
  weights = exp / jnp.where(total > 0, total, 1.0)
  logsumexp = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + peak, _MASKED)
  probs = weights
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    probs = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum('...hqk,...khd->...qhd', probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(v.dtype)
  return AttentionOutput(out, logsumexp[..., 0], weights if return_weights else None)


def cached_attention(q, k, v, cached_keys, cached_values, start, *, scale=None):
  """Causal attention of this call's queries over the cache before the call and its own keys.

  q, k (b, l, h, dk), v (b, l, h, dv): this call's projections at positions
  start .. start + l - 1; cached_keys (b, h, dk, L), cached_values
  (b, h, dv, L): the predict-mode cache before this call (`CausalAttention`'s
  layout; key m holds position m, valid below `start`). -> (b, l, h, dv) in
  v's dtype: each query attends to the cached keys before `start` and to
  this call's keys up to its own position, one float32 softmax over both (the
  arithmetic of `dot_product_attention(..., causal=True)` over the updated
  cache). Reading the cache as it was, in its stored layout, lets XLA update
  it in place after the read: through the updated cache XLA:CPU fused the
  update into the attention's read as well as into the new cache, copying
  the cache twice per step.
  """
  scale = jnp.float32(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
  length = q.shape[1]
  old = jnp.einsum('bqhd,bhdm->bhqm', q, cached_keys, preferred_element_type=jnp.float32) * scale
  new = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  old_allowed = jnp.broadcast_to(
      (jnp.arange(cached_keys.shape[-1], dtype=jnp.int32) < start)[None, None, None, :], old.shape)
  new_allowed = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None],
                                 new.shape)
  old = jnp.where(old_allowed, old, _MASKED)
  new = jnp.where(new_allowed, new, _MASKED)
  peak = jax.lax.stop_gradient(jnp.maximum(jnp.max(old, axis=-1, keepdims=True),
                                           jnp.max(new, axis=-1, keepdims=True)))
  old = jnp.where(old_allowed, jnp.exp(old - peak), 0.0)
  new = jnp.where(new_allowed, jnp.exp(new - peak), 0.0)
  total = jnp.sum(old, axis=-1, keepdims=True) + jnp.sum(new, axis=-1, keepdims=True)
  total = jnp.where(total > 0, total, 1.0)
  out = (jnp.einsum('bhqm,bhvm->bqhv', (old / total).astype(v.dtype), cached_values,
                    preferred_element_type=jnp.float32)
         + jnp.einsum('bhqk,bkhv->bqhv', (new / total).astype(v.dtype), v,
                      preferred_element_type=jnp.float32))
  return out.astype(v.dtype)


def dot_product_attention(q, k, v, *, mask=None, causal=False, q_positions=None,
                          k_positions=None, scale=None, dropout_rate=0.0, dropout_rng=None,
                          chunk_len=None, return_weights=False, return_details=False,
                          q_segment_ids=None, k_segment_ids=None):
  """Exact scaled dot-product attention: softmax(q k^T * scale) v per head.

  Args:
    q: (*batch, lq, h, dk) queries.
    k: (*batch, lk, h, dk) keys.
    v: (*batch, lk, h, dv) values.
    mask: optional bool, broadcastable to (*batch, h, lq, lk) (missing leading
      axes are added); True = the query may attend to the key. A padding
      mask (b, lk) of real tokens becomes `padding_mask(m)` = (b, 1, 1, lk).
      A mask whose lq axis is 1 is never expanded to (lq, lk).
    causal: also forbid keys whose position is after the query's position.
    q_positions: int (lq,) or (*batch, lq) positions of the queries for the
      causal mask; default `arange(lq)`. In predict mode a step at cache
      position p passes `p + arange(lq)`.
    k_positions: int (lk,) or (*batch, lk) positions of the keys; default
      `arange(lk)`.
    scale: multiplies the logits; default 1 / sqrt(dk).
    dropout_rate: attention dropout on the probabilities (needs `dropout_rng`).
      With `chunk_len`, chunk i draws from `fold_in(dropout_rng, i)`, so
      dropout masks differ from the unchunked call's (both are valid draws).
    dropout_rng: a `jax.random` key, used when `dropout_rate > 0`.
    chunk_len: process queries `chunk_len` at a time (scanned, rematerialised);
      memory linear in length, same result. None or >= lq: one chunk.
    return_weights: also return the (*batch, h, lq, lk) probabilities
      (quadratic memory, for visualisation).
    return_details: return an `AttentionOutput` (out, logsumexp, weights)
      instead of the output array alone.
    q_segment_ids, k_segment_ids: int (*batch, lq) and (*batch, lk) (or
      without the batch axes), both or neither: the document of each query
      and key in a packed row; a query attends only to keys of its document.

  Returns:
    (*batch, lq, h, dv) in `v`'s dtype, or an `AttentionOutput` when
    `return_details` (or `(out, weights)` when only `return_weights`).
  """
  _check_shapes(q, k, v)
  if dropout_rate and not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dot_product_attention: dropout_rate > 0 needs a dropout_rng.')
  if chunk_len is not None and (not isinstance(chunk_len, int) or chunk_len < 1):
    raise ValueError(f'chunk_len must be a positive int or None, got {chunk_len!r}.')
  batch_shape, lq, lk = q.shape[:-3], q.shape[-3], k.shape[-3]
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  mask = _full_mask(mask, q.ndim)
  if (q_segment_ids is None) != (k_segment_ids is None):
    raise ValueError('dot_product_attention needs both q_segment_ids and k_segment_ids, or '
                     'neither.')
  if q_segment_ids is not None:
    q_segment_ids = _segments_of(q_segment_ids, lq, batch_shape, 'q_segment_ids')
    k_segment_ids = _segments_of(k_segment_ids, lk, batch_shape, 'k_segment_ids')
  blocks = _causal_blocks(lq, lk, chunk_len)
  if (causal and blocks and mask is None and not dropout_rate and not return_weights
      and q_positions is None and k_positions is None):
    out, lse = causal_blocked_attention(q, k, v, scale=scale, block_len=blocks,
                                        segment_ids=q_segment_ids)
    result = AttentionOutput(out, lse, None)
    return result if return_details else result.out
  if causal:
    q_positions = _positions(q_positions, lq, batch_shape, 'q_positions')
    k_positions = _positions(k_positions, lk, batch_shape, 'k_positions')
  args = (causal, scale, float(dropout_rate), dropout_rng, return_weights)
  if chunk_len is None or chunk_len >= lq:
    result = _attend(q, k, v, mask, q_positions, k_positions, *args, q_segment_ids,
                     k_segment_ids)
  else:
    result = _chunked(q, k, v, mask, q_positions, k_positions, chunk_len, *args,
                      q_segment_ids=q_segment_ids, k_segment_ids=k_segment_ids)
  if return_details:
    return result
  return (result.out, result.weights) if return_weights else result.out


def _segments_of(segment_ids, length, batch_shape, what):
  """Segment ids as int32 (*batch, length)."""
  segment_ids = jnp.asarray(segment_ids)
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f'{what} must be integers (document ids), got {segment_ids.dtype}.')
  if segment_ids.shape[-1:] != (length,) or segment_ids.ndim > len(batch_shape) + 1:
    raise ValueError(f'{what} must have shape (*batch, {length}) with *batch = '
                     f'{tuple(batch_shape)}, got {tuple(segment_ids.shape)}.')
  segment_ids = jnp.reshape(segment_ids.astype(jnp.int32), (1,) * (
      len(batch_shape) + 1 - segment_ids.ndim) + segment_ids.shape)
  return jnp.broadcast_to(segment_ids, batch_shape + (length,))


# ----------------------------------------------------------------------------
# Causal attention in query blocks that skip the keys after the block.

MAX_SEGMENTS = 8  # Key ranges of the causal fast path (each a loop over query blocks).


def _causal_blocks(lq: int, lk: int, chunk_len):
  """The query block length of the causal fast path (chunk_len), or None if it does not apply.

  It applies to self-attention (lq == lk) with query chunking, lq a multiple
  of chunk_len.
  """
  if chunk_len is None or chunk_len >= lq or lq != lk or lq % chunk_len:
    return None
  return chunk_len


def causal_blocked_attention(q, k, v, *, scale: float, block_len: int, segment_ids=None):
  """Exact causal self-attention, `block_len` queries at a time: (out, logsumexp).

  q, k (*batch, l, h, dk), v (*batch, l, h, dv), positions 0..l-1 for both,
  l a multiple of `block_len`. The query blocks are split into up to
  MAX_SEGMENTS consecutive segments; segment s loops over its blocks against
  the keys up to its own end only, so most keys after a query are never
  touched (with S segments the work is (S + 1) / 2S of the full square).
  The backward pass (flash-attention style) recomputes each block's weights
  from the stored log-normalisers. Memory is linear in l: one loop step's
  (h, block_len, keys) logits at a time. Returns out (*batch, l, h, dv) in
  v's dtype and logsumexp (*batch, h, l) float32. With `segment_ids` int
  (*batch, l) (a packed row's documents) a query also skips the keys of
  other documents.
  """
  batch_shape, l, h = q.shape[:-3], q.shape[-3], q.shape[-2]
  heads_first = lambda x: jnp.swapaxes(jnp.reshape(x, (-1,) + x.shape[-3:]), 1, 2)
  if segment_ids is not None:
    segment_ids = jnp.reshape(segment_ids, (-1, l))
  out, lse = _causal_blocked(float(scale), int(block_len), heads_first(q), heads_first(k),
                             heads_first(v), segment_ids)
  out = jnp.swapaxes(out, 1, 2).astype(v.dtype)
  return (jnp.reshape(out, batch_shape + out.shape[1:]), jnp.reshape(lse, batch_shape + (h, l)))


def _segments(l: int, block_len: int):
  """[(first block, blocks, key end)] of the causal fast path."""
  n_blocks = l // block_len
  n_segments = max(d for d in range(1, min(MAX_SEGMENTS, n_blocks) + 1) if n_blocks % d == 0)
  per = n_blocks // n_segments
  return [(s * per, per, (s + 1) * per * block_len) for s in range(n_segments)]


def _logits(scale, block_len, i, q, k_end, segment_ids):
  """Block i's scaled, causally masked logits (n, h, B, E), float32; q (n, h, l, d).

  segment_ids: None, or int (n, l): keys of another document are masked too.
  """
  qi = jax.lax.dynamic_slice_in_dim(q, i * block_len, block_len, axis=2)
  s = jnp.einsum('nhqd,nhkd->nhqk', qi, k_end, preferred_element_type=jnp.float32)
  s = s * jnp.float32(scale)
  q_pos = jax.lax.broadcasted_iota(jnp.int32, s.shape[2:], 0) + i * block_len
  k_pos = jax.lax.broadcasted_iota(jnp.int32, s.shape[2:], 1)
  allowed = k_pos <= q_pos
  if segment_ids is not None:
    q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, i * block_len, block_len, axis=1)
    k_seg = segment_ids[:, :k_end.shape[2]]
    same = (q_seg[:, :, None] == k_seg[:, None, :])[:, None]  # (n, 1, B, E)
    allowed = jnp.logical_and(allowed[None, None], same)
  return qi, jnp.where(allowed, s, _MASKED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _causal_blocked(scale, block_len, q, k, v, segment_ids):
  return _causal_blocked_fwd(scale, block_len, q, k, v, segment_ids)[0]


def _causal_blocked_fwd(scale, block_len, q, k, v, segment_ids):
  n, h, l = q.shape[:3]
  out = jnp.zeros((n, h, l, v.shape[-1]), jnp.float32)
  lse = jnp.zeros((n, h, l), jnp.float32)
  for first, count, end in _segments(l, block_len):
    k_end, v_end = k[:, :, :end], v[:, :, :end]

    def step(j, carry, first=first, k_end=k_end, v_end=v_end):
      out, lse = carry
      i = first + j
      _, s = _logits(scale, block_len, i, q, k_end, segment_ids)
      peak = jnp.max(s, axis=-1, keepdims=True)
      e = jnp.exp(s - peak)
      total = jnp.sum(e, axis=-1, keepdims=True)
      o = jnp.einsum('nhqk,nhkd->nhqd', (e * (1.0 / total)).astype(v.dtype), v_end,
                     preferred_element_type=jnp.float32)
      out = jax.lax.dynamic_update_slice_in_dim(out, o, i * block_len, axis=2)
      lse = jax.lax.dynamic_update_slice_in_dim(lse, (peak + jnp.log(total))[..., 0],
                                                i * block_len, axis=2)
      return out, lse

    out, lse = jax.lax.fori_loop(0, count, step, (out, lse))
  return (out, lse), (q, k, v, out, lse, segment_ids)


def _causal_blocked_bwd(scale, block_len, residuals, cotangents):
  q, k, v, out, lse, segment_ids = residuals
  d_out, d_lse = cotangents
  d_out = d_out.astype(jnp.float32)
  # d logit = p (dp - sum_k p dp + d lse), and sum_k p dp = d_out . out per query.
  row = jnp.sum(d_out * out, axis=-1) - d_lse.astype(jnp.float32)  # (n, h, l)
  l = q.shape[2]
  dq = jnp.zeros(q.shape, jnp.float32)
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for first, count, end in _segments(l, block_len):
    k_end, v_end = k[:, :, :end], v[:, :, :end]

    def step(j, carry, first=first, k_end=k_end, v_end=v_end):
      dq, dk_end, dv_end = carry
      i = first + j
      qi, s = _logits(scale, block_len, i, q, k_end, segment_ids)
      rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * block_len, block_len, axis=2)
      p = jnp.exp(s - rows(lse)[..., None])
      do_i = rows(d_out)
      dp = jnp.einsum('nhqd,nhkd->nhqk', do_i, v_end, preferred_element_type=jnp.float32)
      ds = p * (dp - rows(row)[..., None]) * jnp.float32(scale)
      dq_i = jnp.einsum('nhqk,nhkd->nhqd', ds, k_end, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block_len, axis=2)
      dk_end = dk_end + jnp.einsum('nhqk,nhqd->nhkd', ds, qi, preferred_element_type=jnp.float32)
      dv_end = dv_end + jnp.einsum('nhqk,nhqd->nhkd', p, do_i, preferred_element_type=jnp.float32)
      return dq, dk_end, dv_end

    zeros_k = jnp.zeros(k_end.shape, jnp.float32)
    zeros_v = jnp.zeros(v_end.shape, jnp.float32)
    dq, dk_end, dv_end = jax.lax.fori_loop(0, count, step, (dq, zeros_k, zeros_v))
    dk = dk.at[:, :, :end].add(dk_end)
    dv = dv.at[:, :, :end].add(dv_end)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal_blocked.defvjp(_causal_blocked_fwd, _causal_blocked_bwd)


def _chunked(q, k, v, mask, q_positions, k_positions, chunk_len, causal, scale, dropout_rate,
             dropout_rng, return_weights, q_segment_ids=None, k_segment_ids=None):
  """Scans `_attend` over query chunks, each rematerialised in the backward pass."""
  lq = q.shape[-3]
  n_chunks = -(-lq // chunk_len)
  padded = n_chunks * chunk_len

  def split(x, axis):
    """Pads `axis` (counted from the end) to `padded` and moves the chunk axis first."""
    axis = x.ndim + axis
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - lq)
    x = jnp.pad(x, pad)
    x = jnp.reshape(x, x.shape[:axis] + (n_chunks, chunk_len) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  def join(y, axis):
    """Inverse of `split` for an output whose query axis is `axis` (from the end)."""
    axis = y.ndim + axis - 1  # Where the chunk axis goes, just before the within-chunk axis.
    y = jnp.moveaxis(y, 0, axis)
    y = jnp.reshape(y, y.shape[:axis] + (padded,) + y.shape[axis + 2:])
    return jax.lax.slice_in_dim(y, 0, lq, axis=axis)

  xs = {'q': split(q, -3), 'index': jnp.arange(n_chunks)}
  if causal:
    xs['q_positions'] = split(q_positions, -1)
  if q_segment_ids is not None:
    xs['q_segment_ids'] = split(q_segment_ids, -1)
  mask_per_chunk = mask is not None and mask.shape[-2] != 1
  if mask_per_chunk:
    xs['mask'] = split(mask, -2)

  def body(_, chunk):
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, chunk['index'])
    result = _attend(chunk['q'], k, v, chunk['mask'] if mask_per_chunk else mask,
                     chunk.get('q_positions'), k_positions, causal, scale, dropout_rate, rng,
                     return_weights, chunk.get('q_segment_ids'), k_segment_ids)
    return None, result

  _, result = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), None, xs)
  weights = None if result.weights is None else join(result.weights, -2)
  return AttentionOutput(join(result.out, -3), join(result.logsumexp, -1), weights)
