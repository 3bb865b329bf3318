"""Magnitude pruning as an optax transformation: the masks live in the optimizer state.

`magnitude_pruning(...)` is a `GradientTransformation` chained after the
optimizer (`optimizers.make_optimizer` adds it when `config.pruning.method`
is 'magnitude'). Its state, `PruningState`, holds one bool mask per pruned
parameter (True = kept), shaped and named like the parameter, so the masks
are sharded like their parameters (`state.opt_state_shardings` follows paths)
and checkpointed and restored with the rest of the optimizer state.

Each update returns `where(mask, update, -param)`: a kept weight moves exactly
as the optimizer says, a pruned one lands on exactly 0.0 and stays there.

Schedule (Zhu & Gupta, 2017): the sparsity after train step t (1-based; the
update with optax count t - 1) is

  0                                              t < start_step
  target * (1 - (1 - (t - start) / (end - start))^power)   start <= t < end
  target                                         t >= end_step

and the masks are recomputed only at t = start + k * frequency (t <= end) and
at t = end, from the magnitudes of the weights the update would make
(already-pruned weights rank first, so a mask only ever loses entries).
start == end is one-shot pruning. The `k` = round(sparsity * n) weights
of smallest magnitude are pruned: over all pruned parameters together
(scope 'global') or within each parameter (scope 'per_layer'; a scanned
stack's parameter, leading axis 'layers', within each of its layers).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from terraflax.train import optimizers

SCOPES = ('global', 'per_layer')
METHODS = ('none', 'magnitude')
# The dense kernels of attention (query/key/value/output; LSH's qk) and feed-forward blocks.
DEFAULT_PARAMS = (r'(Attention\w*/(query|key|value|qk|output)(/kernel)?'
                  r'|FeedForward\w*/Dense_\d+/kernel)$')


class PruningState(NamedTuple):
  """`count`: updates applied (train step t = count + 1); `masks`: bool, True = kept, one
  per pruned parameter (`optax.MaskedNode()` for the others)."""

  count: jax.Array
  masks: Any


def sparsity_at(step, *, target: float, start_step: int, end_step: int, power: int = 3):
  """The scheduled sparsity after train step `step` (1-based; array or int), float32."""
  t = jnp.asarray(step, jnp.float32)
  span = max(end_step - start_step, 1)
  frac = jnp.clip((t - start_step) / span, 0.0, 1.0)
  ramp = target * (1.0 - (1.0 - frac) ** power)
  return jnp.where(t < start_step, 0.0, jnp.where(t >= end_step, target, ramp)).astype(
      jnp.float32)


def is_mask_step(step, *, start_step: int, end_step: int, frequency: int):
  """Whether the masks are recomputed after train step `step` (1-based), bool ()."""
  t = jnp.asarray(step, jnp.int32)
  on_grid = (t >= start_step) & (t <= end_step) & ((t - start_step) % frequency == 0)
  return on_grid | (t == end_step)


def selected(params, pattern: str):
  """True for the leaves whose path matches `pattern` (a regex searched in the path)."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(regex.search(optimizers.path_name(path))), params)


def _keep_mask(scores, k, group_shape):
  """bool mask over `scores` (float, any shape) keeping all but the k lowest of each group.

  `group_shape`: scores reshaped to (groups, -1); k is a traced int.
  Exactly k entries of each group are False (ties broken by position).
  """
  flat = scores.reshape(group_shape)
  ranks = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1, stable=True)
  return (ranks >= k).reshape(scores.shape)


def magnitude_pruning(*, sparsity: float, start_step: int, end_step: int, frequency: int = 1,
                      scope: str = 'global', pattern: str = DEFAULT_PARAMS, power: int = 3,
                      stacked=None) -> optax.GradientTransformation:
  """Magnitude pruning to `sparsity` on the schedule above, chained after an optimizer.

  Args:
    sparsity: the final fraction of pruned weights, in [0, 1).
    start_step, end_step: the schedule's first and last train steps (1-based,
      end >= start; equal: one-shot).
    frequency: train steps between mask updates on the way.
    scope: 'global' (one magnitude threshold for all pruned parameters) or
      'per_layer' (each parameter, and each layer of a stacked one, alone).
    pattern: a regex searched in each parameter path: which ones are pruned.
    power: the schedule's exponent (3: Zhu & Gupta's cubic).
    stacked: a tree of bools like the parameters (or None: none) that is True
      where a parameter's leading axis is a scanned stack of layers.
  """
  if scope not in SCOPES:
    raise ValueError(f'magnitude_pruning scope must be one of {SCOPES}, got {scope!r}.')
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'magnitude_pruning sparsity must be in [0, 1), got {sparsity!r}.')
  if end_step < start_step or start_step < 0 or frequency < 1:
    raise ValueError(f'magnitude_pruning needs 0 <= start_step <= end_step and frequency >= 1, '
                     f'got start_step={start_step}, end_step={end_step}, frequency={frequency}.')

  def which(tree):
    return selected(tree, pattern)

  def init(tree):
    chosen = which(tree)
    return PruningState(count=jnp.zeros((), jnp.int32), masks=jax.tree_util.tree_map(
        lambda p, on: jnp.ones(p.shape, jnp.bool_) if on else optax.MaskedNode(), tree, chosen))

  def new_masks(masks, candidates, step):
    """Masks pruning round(sparsity_at(step) * n) weights by |candidate| (pruned first)."""
    target = sparsity_at(step, target=sparsity, start_step=start_step, end_step=end_step,
                         power=power)
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    cands = jax.tree_util.tree_leaves(candidates)
    flags = (jax.tree_util.tree_leaves(_where_masked(lambda m, s: s, masks, stacked))
             if stacked is not None else [False] * len(leaves))
    # Already-pruned weights score -1, so they stay pruned; the others |w| >= 0.
    scores = [jnp.where(m, jnp.abs(c.astype(jnp.float32)), -1.0) for m, c in zip(leaves, cands)]
    if scope == 'global':
      joined = jnp.concatenate([s.reshape(-1) for s in scores])
      k = jnp.round(target * joined.size).astype(jnp.int32)
      keep = _keep_mask(joined, k, (1, -1))
      out, offset = [], 0
      for s in scores:
        out.append(keep[offset:offset + s.size].reshape(s.shape))
        offset += s.size
    else:
      out = []
      for s, stack in zip(scores, flags):
        groups = s.shape[0] if (stack and s.ndim > 1) else 1
        k = jnp.round(target * (s.size // groups)).astype(jnp.int32)
        out.append(_keep_mask(s, k, (groups, -1)))
    return jax.tree_util.tree_unflatten(treedef, out)

  def update(updates, state, tree=None):
    if tree is None:
      raise ValueError('magnitude_pruning needs the parameters: tx.update(updates, state, '
                       'params).')
    step = state.count + 1
    masks = state.masks
    candidates = _where_masked(lambda m, p, u: jnp.where(m, p + u, 0.0), masks, tree, updates)
    masks = jax.lax.cond(
        is_mask_step(step, start_step=start_step, end_step=end_step, frequency=frequency),
        lambda: new_masks(masks, candidates, step), lambda: masks)
    out = jax.tree_util.tree_map(
        lambda m, u, p: u if isinstance(m, optax.MaskedNode) else jnp.where(m, u, -p),
        masks, updates, tree, is_leaf=_is_masked_node)
    return out, PruningState(count=optax.safe_int32_increment(state.count), masks=masks)

  return optax.GradientTransformation(init, update)


def _is_masked_node(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _where_masked(f, masks, *trees):
  """`f(mask, *leaves)` where `masks` holds an array, `MaskedNode()` elsewhere."""
  return jax.tree_util.tree_map(
      lambda m, *xs: m if _is_masked_node(m) else f(m, *xs), masks, *trees,
      is_leaf=_is_masked_node)


def sparsity(params, masks=None) -> float:
  """The fraction of exact zeros among the leaves `masks` prunes (all leaves if None)."""
  if masks is None:
    leaves = jax.tree_util.tree_leaves(params)
  else:
    leaves = jax.tree_util.tree_leaves(_where_masked(lambda m, p: p, masks, params))
  total = sum(x.size for x in leaves)
  zeros = sum(int(jnp.sum(x == 0)) for x in leaves)
  return zeros / max(total, 1)


def find_state(opt_state) -> PruningState | None:
  """The `PruningState` inside an optimizer state (a chain's tuple), or None."""
  found = []
  def visit(x):
    if isinstance(x, PruningState):
      found.append(x)
      return True
    return False
  jax.tree_util.tree_leaves(opt_state, is_leaf=visit)
  return found[0] if found else None


def stacked_axes(boxed_params):
  """True for the (boxed, `nn.LogicallyPartitioned`) parameters whose first axis is 'layers'."""
  def first_is_layers(x):
    names = getattr(x, 'names', None) or ()
    return bool(names) and names[0] == 'layers'
  return jax.tree_util.tree_map(first_is_layers, boxed_params,
                                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def add_pruning(tx: optax.GradientTransformation, pruning_config,
                boxed_params) -> optax.GradientTransformation:
  """`tx` followed by `config.pruning`'s magnitude pruning (`tx` itself for method 'none').

  `boxed_params`: the model's (abstract) boxed parameters, whose axis names
  say which parameters are scanned stacks (pruned layer by layer when
  scope='per_layer').
  """
  c = pruning_config
  if c.method == 'none':
    return tx
  return optax.chain(tx, magnitude_pruning(
      sparsity=float(c.sparsity), start_step=int(c.start_step), end_step=int(c.end_step),
      frequency=int(c.frequency), scope=c.scope, pattern=c.params, power=int(c.power),
      stacked=stacked_axes(boxed_params)))
