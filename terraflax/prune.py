"""Structured pruning: drop feed-forward hidden units and attention heads, get a smaller model.

  python -m terraflax.prune --workdir=IN --to=OUT --ff_keep=0.5 --heads_keep=0.5 \\
      [--importance=norm|taylor] [--step=N]
  python -m terraflax.prune --workdir=IN --to=OUT --sparsity=0.9 [--ff_multiple=16]

keeps the same number of units (round(ff_keep * d_ff)) in every feed-forward
block and of heads (round(heads_keep * n_heads)) in every attention layer, so
OUT's `config.json` stays uniform: `model.d_ff` and `model.n_heads` shrink and
the per-head widths are kept as `model.d_qk` / `model.d_v`. `--sparsity=S`
instead removes the fraction S of the feed-forward and attention weights:
heads in proportion (at least one), hidden units the rest
(`keep_for_sparsity`). OUT holds the smaller parameters (one checkpoint,
step 0, as `terraflax.models.convert` writes), `pruning.json` (what was kept,
and the fraction of those weights removed) and IN's tokenizer; it decodes
with `python -m terraflax.decoding --workdir=OUT` and fine-tunes with
`--config.init_from=OUT` (and OUT's model fields).

Importance of a unit / head, per layer (each layer of a scanned stack alone):
  norm     the L2 norm of all its weights (the unit's column of the first
           Dense and bias, its row of the second; a head's slices of the
           query/key/value/output projections, LSH's qk/value/output)
  taylor   |sum over its weights of gradient x weight| of the loss on a few
           evaluation batches of IN's data: the first-order change of the
           loss when the unit is removed

`structured_masks(...)` zeroes the dropped units and heads in the full model
instead: the same function as the smaller model (tests compare the two).
Supported: models whose feed-forward blocks are `FeedForward` layers and whose
attention is 'full' (query/key/value/output) or 'lsh' (qk/value/output), with
factories that take `d_qk` and `d_v` (TransformerLM, ReformerLM).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from terraflax import errors
from terraflax import rng as rng_lib
from terraflax import tokenizer as tokenizer_lib
from terraflax import workdir as workdir_lib
from terraflax.models import spec as spec_lib
from terraflax.train import config as config_lib
from terraflax.train import evaluation

PRUNING_FILE = 'pruning.json'
IMPORTANCES = ('norm', 'taylor')
_FF = re.compile(r'^(.*FeedForward\w*)/(Dense_(\d+))/kernel$')
_MERGED = re.compile(r'^(.*)/query/kernel$')
_LSH = re.compile(r'^(.*LSHSelfAttention\w*)/qk$')


class PruneError(errors.UserError, ValueError):
  """A workdir or a keep fraction structured pruning cannot use."""


@dataclasses.dataclass(frozen=True)
class Group:
  """The parameters of one feed-forward block or attention layer, and how units sit in them.

  `axes` maps a parameter path to (axis, per_unit): the units' axis counted
  from the end, and how many consecutive entries of that axis one unit owns
  (a merged head's width; 1 for a hidden unit or an explicit head axis).
  """

  kind: str  # 'ff' or 'heads'.
  prefix: str
  n_units: int
  axes: dict[str, tuple[int, int]]


def find_groups(flat: dict[str, Any], *, d_ff: int, n_heads: int) -> list[Group]:
  """The feed-forward blocks (d_ff hidden units) and attention layers (n_heads) in `flat`."""
  groups = []
  ff = {}
  for path in flat:
    m = _FF.match(path)
    if m:
      ff.setdefault(m.group(1), []).append((int(m.group(3)), m.group(2)))
  for prefix, denses in sorted(ff.items()):
    denses.sort()
    first, second = denses[0][1], denses[-1][1]
    if len(denses) != 2 or flat[f'{prefix}/{first}/kernel'].shape[-1] != d_ff:
      continue
    axes = {f'{prefix}/{first}/kernel': (-1, 1), f'{prefix}/{second}/kernel': (-2, 1)}
    if f'{prefix}/{first}/bias' in flat:
      axes[f'{prefix}/{first}/bias'] = (-1, 1)
    groups.append(Group('ff', prefix, d_ff, axes))
  for path in sorted(flat):
    m = _MERGED.match(path)
    if m:
      prefix = m.group(1)
      d_qk = flat[path].shape[-1] // n_heads
      d_v = flat[f'{prefix}/value/kernel'].shape[-1] // n_heads
      axes = {}
      for name, width in (('query', d_qk), ('key', d_qk), ('value', d_v)):
        axes[f'{prefix}/{name}/kernel'] = (-1, width)
        if f'{prefix}/{name}/bias' in flat:
          axes[f'{prefix}/{name}/bias'] = (-1, width)
      axes[f'{prefix}/output/kernel'] = (-2, d_v)
      groups.append(Group('heads', prefix, n_heads, axes))
    m = _LSH.match(path)
    if m:
      prefix = m.group(1)
      groups.append(Group('heads', prefix, n_heads, {
          f'{prefix}/qk': (-2, 1), f'{prefix}/value': (-2, 1), f'{prefix}/output': (-3, 1)}))
  return groups


def unit_sums(group: Group, values: dict[str, Any]) -> np.ndarray:
  """(*lead, n_units): `values` (per-weight, shaped like the parameters) summed per unit.

  `lead` are the leading axes before the block's own (a scanned stack's layers).
  """
  total = None
  for path, (axis, per_unit) in group.axes.items():
    x = np.asarray(values[path], np.float64)
    axis = x.ndim + axis
    split = x.reshape(x.shape[:axis] + (group.n_units, per_unit) + x.shape[axis + 1:])
    lead = _lead_dims(path, group, x)
    # Sum everything but the leading (stack) axes and the units axis.
    moved = np.moveaxis(split, axis, lead)  # (*lead, units, ...)
    summed = moved.reshape(moved.shape[:lead + 1] + (-1,)).sum(axis=-1)
    total = summed if total is None else total + summed
  return total


def _lead_dims(path: str, group: Group, x) -> int:
  """How many leading (stack) axes parameter `path` of `group` has beyond its own rank."""
  own = {'ff': {'kernel': 2, 'bias': 1}, 'heads': {'kernel': 2, 'bias': 1}}
  name = path.rsplit('/', 1)[-1]
  if group.kind == 'heads' and name in ('qk', 'value', 'output'):
    return x.ndim - 3
  return x.ndim - own[group.kind][name]


def scores_norm(flat: dict[str, Any], groups: list[Group]) -> list[np.ndarray]:
  """Per group (*lead, n_units): the L2 norm of each unit's weights."""
  squares = {p: np.square(np.asarray(x, np.float64)) for p, x in flat.items()}
  return [np.sqrt(unit_sums(g, squares)) for g in groups]


def scores_taylor(flat: dict[str, Any], grads: dict[str, Any],
                  groups: list[Group]) -> list[np.ndarray]:
  """Per group (*lead, n_units): |sum of gradient x weight| over each unit's weights."""
  products = {p: np.asarray(grads[p], np.float64) * np.asarray(x, np.float64)
              for p, x in flat.items()}
  return [np.abs(unit_sums(g, products)) for g in groups]


def keep_indices(scores: np.ndarray, n_keep: int) -> np.ndarray:
  """(*lead, n_keep) int: the `n_keep` highest-scoring units of each layer, in their order."""
  order = np.argsort(-scores, axis=-1, kind='stable')[..., :n_keep]
  return np.sort(order, axis=-1)


def _take(x, group: Group, path: str, kept: np.ndarray):
  """Parameter `path` of `group` with only the `kept` (*lead, k) units."""
  axis, per_unit = group.axes[path]
  x = np.asarray(x)
  lead = _lead_dims(path, group, x)
  axis = x.ndim + axis
  split = x.reshape(x.shape[:axis] + (group.n_units, per_unit) + x.shape[axis + 1:])
  index = kept.reshape(kept.shape + (1,) * (split.ndim - lead - 1))
  index = np.moveaxis(index, lead, axis)  # The kept units on the units axis.
  taken = np.take_along_axis(split, index, axis=axis)
  return taken.reshape(x.shape[:axis] + (kept.shape[-1] * per_unit,) + x.shape[axis + 1:])


def _zero(x, group: Group, path: str, kept: np.ndarray):
  """Parameter `path` of `group` with the units not in `kept` set to 0 (same shape)."""
  axis, per_unit = group.axes[path]
  x = np.array(x)
  lead = _lead_dims(path, group, x)
  axis_abs = x.ndim + axis
  keep = np.zeros(kept.shape[:-1] + (group.n_units,), bool)
  np.put_along_axis(keep, kept, True, axis=-1)
  keep = np.repeat(keep, per_unit, axis=-1)  # (*lead, n_units * per_unit)
  shape = [1] * x.ndim
  shape[:lead] = keep.shape[:-1]
  shape[axis_abs] = keep.shape[-1]
  return np.where(keep.reshape(shape), x, 0).astype(x.dtype)


def plan(groups, scores, *, ff_keep: int, heads_keep: int):
  """[(group, kept (*lead, k))] for the groups with units to drop."""
  out = []
  for group, score in zip(groups, scores):
    k = ff_keep if group.kind == 'ff' else heads_keep
    if k < group.n_units:
      out.append((group, keep_indices(score, k)))
  return out


def apply_plan(flat: dict[str, Any], kept_plan, *, zero: bool = False) -> dict[str, np.ndarray]:
  """`flat` with the plan's units removed (smaller arrays) or, `zero=True`, set to 0."""
  out = {p: np.asarray(x) for p, x in flat.items()}
  for group, kept in kept_plan:
    for path in group.axes:
      out[path] = (_zero if zero else _take)(out[path], group, path, kept)
  return out


def n_kept(fraction: float, n: int, flag: str) -> int:
  """round(fraction * n), at least 1; `fraction` in (0, 1]."""
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise PruneError(f'--{flag} must be a fraction in (0, 1], got {fraction!r}.')
  return max(1, int(round(fraction * n)))


def keep_for_sparsity(flat: dict[str, Any], *, d_ff: int, n_heads: int, sparsity: float,
                      ff_multiple: int = 1) -> tuple[int, int]:
  """(hidden units, heads) to keep in every layer so that `sparsity` of the
  feed-forward and attention weights go.

  Heads go in proportion (at least one stays); the hidden units then make up
  the rest, so the target holds where the last head cannot go (4 heads at
  90%: 1 head and fewer units than 10%). The units kept are a multiple of
  `ff_multiple` (16: the native feed-forward kernel's lane width).
  """
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
    raise PruneError(f'--sparsity must be a fraction in [0, 1), got {sparsity!r}.')
  if not isinstance(ff_multiple, int) or not 1 <= ff_multiple <= d_ff:
    raise PruneError(f'--ff_multiple must be an int in [1, d_ff={d_ff}], got {ff_multiple!r}.')
  groups = find_groups(flat, d_ff=d_ff, n_heads=n_heads)
  per = {kind: sum(np.size(flat[path]) for g in groups if g.kind == kind for path in g.axes)
         for kind in ('ff', 'heads')}
  per_unit, per_head = per['ff'] / d_ff, per['heads'] / n_heads
  if not per_unit:
    raise PruneError('the model has no FeedForward block terraflax.prune can prune; '
                     'use --ff_keep / --heads_keep instead of --sparsity.')
  heads = max(1, round((1 - sparsity) * n_heads)) if per_head else n_heads
  units = ((1 - sparsity) * (per['ff'] + per['heads']) - heads * per_head) / per_unit
  units = max(ff_multiple, min(d_ff, ff_multiple * round(units / ff_multiple)))
  return int(units), int(heads)


def _flat(params) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unflat(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, x in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return tree


def pruned_model_config(model_config, flat, *, ff_keep: int, heads_keep: int):
  """`config.model` of the smaller model: d_ff, n_heads and (heads pruned) d_qk / d_v."""
  model = ml_collections.ConfigDict(model_config.to_dict())
  n_heads = int(model.n_heads)
  if heads_keep < n_heads:
    groups = [g for g in find_groups(flat, d_ff=int(model.d_ff), n_heads=n_heads)
              if g.kind == 'heads']
    if not groups:
      raise PruneError(f'config.model (name={model.name!r}) has no attention layer '
                       'terraflax.prune can prune heads of; use --heads_keep=1.')
    d_qk, d_v = _head_widths(flat, groups[0])
    with model.ignore_type():
      model.d_qk, model.d_v = d_qk, d_v
  with model.ignore_type():
    model.d_ff, model.n_heads = ff_keep, heads_keep
  return model


def _head_widths(flat, group: Group) -> tuple[int, int]:
  if f'{group.prefix}/qk' in flat:
    return int(flat[f'{group.prefix}/qk'].shape[-1]), int(flat[f'{group.prefix}/value'].shape[-1])
  return group.axes[f'{group.prefix}/query/kernel'][1], group.axes[f'{group.prefix}/value/kernel'][1]


def taylor_grads(config, spec: spec_lib.ModelSpec, params, *, n_batches: int = 4):
  """Gradients of the summed loss over `n_batches` evaluation batches of the config's data."""
  experiment = config_lib.validate_config(config)
  model = spec.build('eval')

  def loss(p, batch):
    logits = model.apply({'params': p}, *spec_lib.model_inputs(batch, spec.task),
                         rngs=rng_lib.noise_keys(jax.random.key(0)))
    return evaluation.batch_sums(logits, batch)['loss_sum']

  grad_fn = jax.jit(jax.grad(loss))
  total = jax.tree_util.tree_map(jnp.zeros_like, params)
  for batch in experiment.data.eval_batches(batch_size=config.train.batch_size,
                                            n_batches=n_batches):
    total = jax.tree_util.tree_map(jnp.add, total, grad_fn(params, batch))
  return total


def prune_params(config, params, *, ff_keep: float = 1.0, heads_keep: float = 1.0,
                 sparsity: float | None = None, ff_multiple: int = 1,
                 importance: str = 'norm', grads=None, zero: bool = False):
  """(model config, params, report) of the structurally pruned model of `config.model`.

  ff_keep / heads_keep: the fractions of hidden units / heads kept in every
  layer; or `sparsity`: the fraction of the feed-forward and attention
  weights to remove (`keep_for_sparsity`, with `ff_multiple`). importance:
  'norm' or 'taylor' (needs `grads`, the loss gradients, see
  `taylor_grads`). zero=True keeps the full shapes and config and zeroes the
  dropped units instead (`structured_masks`).
  """
  if importance not in IMPORTANCES:
    raise PruneError(f'--importance must be one of {IMPORTANCES}, got {importance!r}.')
  model = config.model
  for field in ('d_ff', 'n_heads'):
    if not isinstance(model.get(field), int):
      raise PruneError(f'config.model (name={model.get("name")!r}) has no int {field}; '
                       'terraflax.prune needs d_ff and n_heads.')
  d_ff, n_heads = int(model.d_ff), int(model.n_heads)
  flat = _flat(params)
  if sparsity is None:
    k_ff, k_heads = n_kept(ff_keep, d_ff, 'ff_keep'), n_kept(heads_keep, n_heads, 'heads_keep')
  elif ff_keep != 1.0 or heads_keep != 1.0:
    raise PruneError('pass --sparsity or --ff_keep / --heads_keep, not both.')
  else:
    k_ff, k_heads = keep_for_sparsity(flat, d_ff=d_ff, n_heads=n_heads, sparsity=sparsity,
                                      ff_multiple=ff_multiple)
  groups = find_groups(flat, d_ff=d_ff, n_heads=n_heads)
  if k_ff < d_ff and not any(g.kind == 'ff' for g in groups):
    raise PruneError(f'config.model (name={model.name!r}) has no FeedForward block '
                     'terraflax.prune can prune; use --ff_keep=1.')
  if importance == 'taylor':
    if grads is None:
      raise PruneError("importance='taylor' needs the loss gradients (grads=).")
    scores = scores_taylor(flat, _flat(grads), groups)
  else:
    scores = scores_norm(flat, groups)
  kept_plan = plan(groups, scores, ff_keep=k_ff, heads_keep=k_heads)
  new_flat = apply_plan(flat, kept_plan, zero=zero)
  new_model = model if zero else pruned_model_config(model, flat, ff_keep=k_ff,
                                                     heads_keep=k_heads)
  pruned_paths = {path for g in groups for path in g.axes}
  removed = 1 - (sum(np.size(new_flat[p]) for p in pruned_paths)
                 / max(1, sum(np.size(flat[p]) for p in pruned_paths)))
  report = {'d_ff': [d_ff, k_ff], 'n_heads': [n_heads, k_heads], 'importance': importance,
            'removed': removed,
            'params': [int(sum(np.size(x) for x in flat.values())),
                       int(sum(np.size(x) for x in new_flat.values()))],
            'kept': {g.prefix: k.tolist() for g, k in kept_plan}}
  return new_model, _unflat(new_flat), report


def structured_masks(config, params, **kwargs):
  """`params` of the full model with the units and heads `prune_params` would drop zeroed."""
  _, masked, _ = prune_params(config, params, zero=True, **kwargs)
  return masked


def check_shapes(config, params) -> None:
  """Raises `PruneError` unless `config.model`'s abstract init has exactly `params`' shapes."""
  spec = config_lib.model_spec(config)
  abstract = _flat(nn.meta.unbox(spec.abstract_variables(1, config.data.seq_len,
                                                        mode='eval'))['params'])
  got = {p: tuple(np.shape(x)) for p, x in _flat(params).items()}
  want = {p: tuple(x.shape) for p, x in abstract.items()}
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:4]
    raise PruneError(f'the pruned parameters do not fit config.model (name='
                     f'{config.model.name!r}): {diff}; this model kind is not supported.')


def prune_workdir(workdir: str, to: str, *, ff_keep: float = 1.0, heads_keep: float = 1.0,
                  sparsity: float | None = None, ff_multiple: int = 1,
                  importance: str = 'norm', step: int | None = None,
                  n_batches: int = 4) -> dict[str, Any]:
  """Writes the structurally pruned model of `workdir`'s checkpoint to `to`; returns the report."""
  if os.path.isdir(workdir_lib.checkpoint_dir(to)) and os.listdir(workdir_lib.checkpoint_dir(to)):
    raise PruneError(f'{workdir_lib.checkpoint_dir(to)} already holds checkpoints; choose an '
                     'empty --to directory.')
  config, spec, params = spec_lib.load_workdir(workdir, step)
  try:
    config = config_lib.check_fields(config)  # Defaults of fields added since it was written.
  except config_lib.ConfigError:
    if importance == 'taylor':
      raise
  grads = taylor_grads(config, spec, params, n_batches=n_batches) if importance == 'taylor' else None
  model, pruned, report = prune_params(config, params, ff_keep=ff_keep, heads_keep=heads_keep,
                                       sparsity=sparsity, ff_multiple=ff_multiple,
                                       importance=importance, grads=grads)
  new_config = ml_collections.ConfigDict(config.to_dict())
  new_config.model = model
  new_config.init_from = ''
  check_shapes(new_config, pruned)
  os.makedirs(to, exist_ok=True)
  tokenizer = tokenizer_lib.from_workdir(workdir)
  if tokenizer.kind != tokenizer_lib.BYTES:
    tokenizer.save_to(to)
  workdir_lib.write_config(to, new_config)
  workdir_lib.save_params(to, 0, pruned)
  report = dict(report, source=os.path.abspath(workdir), ff_keep=ff_keep, heads_keep=heads_keep,
                sparsity=sparsity)
  with open(os.path.join(to, PRUNING_FILE), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
    f.write('\n')
  return report


def main(argv):
  """`python -m terraflax.prune --workdir=IN --to=OUT --ff_keep=F --heads_keep=F`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  del argv
  f = flags.FLAGS
  report = prune_workdir(f.workdir, f.to, ff_keep=f.ff_keep, heads_keep=f.heads_keep,
                         sparsity=f.sparsity, ff_multiple=f.ff_multiple,
                         importance=f.importance, step=f.step, n_batches=f.batches)
  (before, after), (ff0, ff1), (h0, h1) = report['params'], report['d_ff'], report['n_heads']
  print(f'terraflax.prune: {f.workdir} -> {f.to}: d_ff {ff0} -> {ff1}, n_heads {h0} -> {h1}, '
        f'{before:,} -> {after:,} parameters ({1 - after / before:.1%} removed; '
        f'{report["removed"]:.1%} of the feed-forward and attention weights), importance '
        f'{report["importance"]}.', flush=True)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string('workdir', None, 'The training workdir to prune (config.json, checkpoints/).')
  flags.DEFINE_string('to', None, 'The workdir to write the smaller model to.')
  flags.DEFINE_float('ff_keep', 1.0, 'Fraction of feed-forward hidden units kept in every block.')
  flags.DEFINE_float('heads_keep', 1.0, 'Fraction of attention heads kept in every layer.')
  flags.DEFINE_float('sparsity', None, 'Instead of the keep fractions: the fraction of the '
                     'feed-forward and attention weights to remove (heads in proportion, at '
                     'least one; hidden units make up the rest).')
  flags.DEFINE_integer('ff_multiple', 1, 'With --sparsity: keep a multiple of this many hidden '
                       'units (16 suits the native feed-forward kernel).', lower_bound=1)
  flags.DEFINE_enum('importance', 'norm', list(IMPORTANCES),
                    'Which units go: lowest weight norm, or lowest |gradient x weight| (taylor).')
  flags.DEFINE_integer('batches', 4, "Evaluation batches for importance='taylor'.", lower_bound=1)
  flags.DEFINE_integer('step', None, 'Checkpoint step to prune (default: the latest).')
  flags.register_validator('ff_keep', lambda v: 0 < v <= 1, '--ff_keep must be in (0, 1].')
  flags.register_validator('heads_keep', lambda v: 0 < v <= 1, '--heads_keep must be in (0, 1].')
  flags.mark_flags_as_required(['workdir', 'to'])


if __name__ == '__main__':
  from terraflax import cli  # pylint: disable=g-import-not-at-top
  _define_flags()
  cli.run(main, name='terraflax.prune', user_errors=(config_lib.ConfigError,))
