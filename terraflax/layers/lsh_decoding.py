"""Predict-mode LSH attention: one position at a time over a ring buffer.

`LSHSelfAttention(mode='predict')` keeps the last `m = predict_mem_len`
positions' unit-length keys, values and per-round bucket ids in its `cache`
(a `RingMemory`; position t lives in slot t mod m). A new token attends, in
one softmax, to the remembered keys that share its bucket in any round plus
the `recent` most recent positions (itself masked unless alone): the union of
its rounds, as the rounds combine in training (`lsh_core`). The cost per
token depends on m, never on the prompt's length.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from terraflax.layers.core import after_reads
from terraflax.layers.lsh_core import MASKED_LOGIT, SELF_LOGIT, normalise


class RingMemory(NamedTuple):
  """The decoding state of one LSH attention layer (m slots)."""
  keys: jax.Array  # (b, h, m, d_qk) float32, unit length
  values: jax.Array  # (b, h, m, d_v) float32
  buckets: jax.Array  # (b, h, n, m) int32, each round's bucket id
  slot_positions: jax.Array  # (m,) int32, the position held by each slot, -1 if none


def ring_attend(memory: RingMemory, q, v, q_buckets, start, *, recent: int):
  """Writes positions start.. into `memory` one by one, each attending over it.

  q (b, l, h, d_qk), v (b, l, h, d_v) float32; q_buckets int (b, h, n, l);
  start: int32 scalar, the position of q[:, 0]; `recent`: how many of the
  latest positions every token sees whatever their buckets. Returns the
  updated memory and the outputs (b, l, h, d_v).
  """
  m = memory.slot_positions.shape[0]

  def step(memory, inputs):
    keys_, values_, buckets_, slot_pos_ = memory
    q_t, v_t, bucket_t, t = inputs  # (b, h, k), (b, h, dv), (b, h, n), ()
    slot = t % m
    # Attend over the memory as it was, less the slot about to be overwritten, and over the
    # new position itself (SELF_LOGIT); writing afterwards lets XLA update the memory in
    # place (read after the write, the update was fused into its readers: copies per token;
    # `after_reads` orders the writes after the reads).
    dots = jnp.einsum('bhk,bhmk->bhm', q_t, keys_)
    shares = jnp.any(buckets_ == bucket_t[..., None], axis=2)  # (b, h, m)
    kept = (slot_pos_ >= 0) & (jnp.arange(m, dtype=jnp.int32) != slot)
    near = kept & (t - slot_pos_ < recent)
    visible = kept[None, None] & (shares | near[None, None])
    logits = jnp.where(visible, dots, MASKED_LOGIT)
    peak = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), SELF_LOGIT)
    weights = jnp.exp(logits - peak)
    self_weight = jnp.exp(SELF_LOGIT - peak)  # (b, h, 1)
    total = jnp.sum(weights, axis=-1, keepdims=True) + self_weight
    o_t = (jnp.einsum('bhm,bhmd->bhd', weights, values_) + self_weight * v_t) / total
    keys_ = lax.dynamic_update_slice_in_dim(
        keys_, after_reads(normalise(q_t)[:, :, None], o_t), slot, axis=2)
    values_ = lax.dynamic_update_slice_in_dim(values_, after_reads(v_t[:, :, None], o_t), slot,
                                              axis=2)
    buckets_ = lax.dynamic_update_slice_in_dim(buckets_, after_reads(bucket_t[..., None], o_t),
                                               slot, axis=3)
    slot_pos_ = lax.dynamic_update_slice_in_dim(slot_pos_, after_reads(t[None], o_t), slot,
                                                axis=0)
    return RingMemory(keys_, values_, buckets_, slot_pos_), o_t

  length = q.shape[1]
  xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(q_buckets, 3, 0),
        start + jnp.arange(length, dtype=jnp.int32))
  memory, o = lax.scan(step, RingMemory(*memory), xs)
  return memory, jnp.moveaxis(o, 0, 1)
