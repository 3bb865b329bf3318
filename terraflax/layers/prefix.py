"""Prefix tuning (Li & Liang 2021): trainable keys and values prepended at every attention layer.

  PrefixCausalAttention   [x] -> [y]: (b, l, d) -> (b, l, d)                  1 -> 1
  PrefixAttention         [x, mask] -> [y, mask]: (b, l, d), (b, l) -> same   2 -> 2

Each layer is its base attention layer (`CausalAttention`, `Attention`) with
`n_prefix` extra key/value pairs, parameters `prefix_key` (n_prefix, h, d_qk)
and `prefix_value` (n_prefix, h, d_v), put in front of the keys and values
that the layer projects from its input. Every query may attend to them: they
sit at position -1, before any token, so the causal mask lets them through. In
`'predict'` mode the key/value cache still holds only the tokens; the layer
attends to the cache and to the prefix separately and merges the two softmaxes
by their log-sum-exps (the cache is never copied behind the prefix), so
decoding works unchanged. With
`packed=True` (the base layers' packed signatures) every document of a
packed row attends to the whole prefix and to its own tokens.

The layers keep their base layer's name in parameter paths (`label`), so a
language model trained without a prefix loads by path into the same model
with one (`config.init_from`), and only the `prefix_*` leaves are new. With
the base parameters frozen (`config.optimizer.trainable = 'prefix_'`), the
prefixes are the only trained parameters; `split_prefix` and `merge_prefix`
keep them as a small separate tree, so one base model serves many prefix sets.
"""

from __future__ import annotations

from typing import Any

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from terraflax.layers.attention import Attention, CausalAttention
from terraflax.layers.attention_core import dot_product_attention
from terraflax.layers.core import param_with_axes

PREFIX_PARAMS = ('prefix_key', 'prefix_value')
# A regex (`config.optimizer.trainable`) that selects the prefix parameters.
PREFIX_PATTERN = 'prefix_'


def _check_n_prefix(layer):
  if not isinstance(layer.n_prefix, int) or isinstance(layer.n_prefix, bool) or layer.n_prefix < 1:
    raise ValueError(f'{type(layer).__name__} n_prefix must be a positive int, got '
                     f'{layer.n_prefix!r}.')


def _attend_with_prefix(layer, attend, q, k, v, *, causal=False, mask=None, q_positions=None,
                        k_positions=None, q_segment_ids=None, k_segment_ids=None, **kwargs):
  """`attend` (the base layer's) over [prefix; k] and [prefix; v].

  With segment ids (a packed row) every document sees the whole prefix (it
  is shared by all documents) and, of the tokens, only its own document's.
  """
  b, lk, h = k.shape[0], k.shape[1], k.shape[2]
  init = nn.initializers.normal(layer.prefix_init_scale)
  axes = (None, 'heads', 'head_dim')  # The prefix positions are few: never sharded.
  prefix_key = param_with_axes(layer, 'prefix_key', axes, init, (layer.n_prefix, h, k.shape[-1]))
  prefix_value = param_with_axes(layer, 'prefix_value', axes, init,
                                 (layer.n_prefix, h, v.shape[-1]))

  if (layer.mode == 'predict' and mask is None and q_segment_ids is None
      and not layer.sow_weights):
    return _merged_with_prefix(layer, q, k, v, prefix_key, prefix_value, causal=causal,
                               q_positions=q_positions, k_positions=k_positions, **kwargs)

  def prepend(prefix, x):
    prefix = jnp.broadcast_to(prefix[None].astype(x.dtype), (b,) + prefix.shape)
    return jnp.concatenate([prefix, x], axis=1)

  k, v = prepend(prefix_key, k), prepend(prefix_value, v)
  if mask is not None:  # (..., lk) -> (..., n_prefix + lk): the prefix is always visible.
    mask = jnp.asarray(mask)
    mask = jnp.broadcast_to(mask, mask.shape[:-1] + (lk,))
    mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (layer.n_prefix,), jnp.bool_), mask], -1)
  if causal:
    lq = q.shape[1]
    q_positions = jnp.arange(lq, dtype=jnp.int32) if q_positions is None else q_positions
    k_positions = jnp.arange(lk, dtype=jnp.int32) if k_positions is None else k_positions
    k_positions = jnp.asarray(k_positions, jnp.int32)
    before = jnp.full(k_positions.shape[:-1] + (layer.n_prefix,), -1, jnp.int32)
    k_positions = jnp.concatenate([before, k_positions], axis=-1)
  if q_segment_ids is not None:  # Prefix keys: visible to all; token keys: same document.
    same = q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :]  # (b, 1, lq, lk)
    prefix = jnp.ones(same.shape[:-1] + (layer.n_prefix,), jnp.bool_)
    same = jnp.concatenate([prefix, same], axis=-1)
    mask = same if mask is None else jnp.logical_and(mask, same)
  return attend(q, k, v, causal=causal, mask=mask, q_positions=q_positions,
                k_positions=k_positions, **kwargs)


def _merged_with_prefix(layer, q, k, v, prefix_key, prefix_value, **kwargs):
  """Predict mode: attention over (k, v) and over the prefix, merged by their log-sum-exps.

  Equals attention over [prefix; k] and [prefix; v] without building them, so a
  decoding step reads the key/value cache in place instead of copying it
  behind the prefix. q (b, lq, h, d_qk), k (b, lk, h, d_qk), v (b, lk, h, d_v)
  -> (b, lq, h, d_v). Predict mode has no dropout; the prefix is visible to
  every query.
  """
  tokens = dot_product_attention(q, k, v, chunk_len=layer.chunk_len, return_details=True,
                                 **kwargs)
  scale = jnp.float32(1.0 / math.sqrt(q.shape[-1]))
  logits = jnp.einsum('bqhd,phd->bhqp', q, prefix_key.astype(q.dtype),
                      preferred_element_type=jnp.float32) * scale
  prefix_lse = jax.nn.logsumexp(logits, axis=-1)  # (b, h, lq)
  prefix_out = jnp.einsum('bhqp,phd->bqhd', jnp.exp(logits - prefix_lse[..., None]),
                          prefix_value.astype(jnp.float32))
  peak = jnp.maximum(tokens.logsumexp, prefix_lse)
  w_tokens = jnp.exp(tokens.logsumexp - peak)  # 0 where no token is visible.
  w_prefix = jnp.exp(prefix_lse - peak)
  to_out = lambda w: jnp.transpose(w / (w_tokens + w_prefix), (0, 2, 1))[..., None]
  out = to_out(w_tokens) * tokens.out.astype(jnp.float32) + to_out(w_prefix) * prefix_out
  return out.astype(v.dtype)


class PrefixCausalAttention(CausalAttention):
  """[x] -> [y]: (b, l, d) -> (b, l, d); n_in = n_out = 1. Causal attention with a prefix.

  `CausalAttention` plus `n_prefix` trainable key/value pairs (`prefix_key`
  (n_prefix, h, d_qk), `prefix_value` (n_prefix, h, d_v), initialised from a
  normal of std `prefix_init_scale`) that every position attends to, in every
  mode. Parameter paths read `CausalAttention_<i>/...` (`label`).
  """

  n_prefix: int = 1
  prefix_init_scale: float = 0.02
  label: str = 'CausalAttention'

  def __post_init__(self):
    _check_n_prefix(self)
    super().__post_init__()

  def attend(self, q, k, v, **kwargs):
    return _attend_with_prefix(self, super().attend, q, k, v, **kwargs)


class PrefixAttention(Attention):
  """[x, mask] -> [y, mask]: (b, l, d), (b, l) -> (b, l, d), (b, l); n_in = n_out = 2.

  Bidirectional `Attention` plus `n_prefix` trainable key/value pairs that
  every position attends to (the padding mask does not hide them). Parameter
  paths read `Attention_<i>/...` (`label`).
  """

  n_prefix: int = 1
  prefix_init_scale: float = 0.02
  label: str = 'Attention'

  def __post_init__(self):
    _check_n_prefix(self)
    super().__post_init__()

  def attend(self, q, k, v, **kwargs):
    return _attend_with_prefix(self, super().attend, q, k, v, **kwargs)


def is_prefix_path(path) -> bool:
  """True for a parameter path (a tuple of names) that ends in a prefix parameter."""
  return str(path[-1]) in PREFIX_PARAMS


def split_prefix(params) -> tuple[Any, Any]:
  """(base, prefix): the parameter tree without and with only the `prefix_*` leaves.

  Both keep the nesting of `params`; `merge_prefix(base, prefix)` rebuilds it.
  A prefix tree is what one prefix-tuning run learns: swap it to serve another
  task with the same base model.
  """
  flat = traverse_util.flatten_dict(params)
  base = {p: x for p, x in flat.items() if not is_prefix_path(p)}
  prefix = {p: x for p, x in flat.items() if is_prefix_path(p)}
  if not prefix:
    raise ValueError('split_prefix: the parameters hold no prefix_key/prefix_value leaves; '
                     'build the model with n_prefix > 0.')
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(prefix)


def merge_prefix(base, prefix):
  """The full parameter tree of a prefix model: `base` with the `prefix` leaves added."""
  flat_base, flat_prefix = traverse_util.flatten_dict(base), traverse_util.flatten_dict(prefix)
  bad = [p for p in flat_prefix if not is_prefix_path(p)]
  if bad:
    raise ValueError(f'merge_prefix: prefix holds non-prefix leaves, e.g. {"/".join(bad[0])}.')
  clash = [p for p in flat_prefix if p in flat_base]
  if clash:
    raise ValueError(f'merge_prefix: base already holds prefix leaves, e.g. {"/".join(clash[0])}; '
                     'pass the base tree from split_prefix.')
  return traverse_util.unflatten_dict({**flat_base, **flat_prefix})
