"""Checkpoints with orbax: `WORKDIR/checkpoints/<step>/{params,opt_state,train,data}`.

Items of one checkpoint:
  params     the model parameters (float32)
  opt_state  the optax state
  train      {'step', 'rng', 'pending'}: the step, the base rng key and the
             metric sums accumulated since the last log (so a resumed run logs
             exactly what an uninterrupted one would)
  data       the grain training iterator's JSON state

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a crash mid-save never leaves an unloadable latest step.
`load_for_inference(workdir)` returns the config and the latest parameters
for decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from terraflax import workdir as workdir_lib
from terraflax.models import spec as spec_lib
from terraflax.train import config as config_lib
from terraflax.train import optimizers

def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: a restore target."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))
  return jax.tree_util.tree_map(leaf, tree)


def save(manager: ocp.CheckpointManager, step: int, *, params, opt_state, train: dict,
         data_state: dict) -> None:
  """Saves one checkpoint at `step` (asynchronously if the manager is async)."""
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params),
      opt_state=ocp.args.StandardSave(opt_state),
      train=ocp.args.StandardSave(train),
      data=ocp.args.JsonSave(data_state)), force=True)


def restore(manager: ocp.CheckpointManager, step: int, *, params, opt_state, train: dict):
  """(params, opt_state, train, data_state) of `step`, laid out like the given trees."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_like(params)),
      opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
      train=ocp.args.StandardRestore(abstract_like(train)),
      data=ocp.args.JsonRestore()))
  return restored['params'], restored['opt_state'], restored['train'], restored['data']


def load_for_inference(workdir: str, step: int | None = None):
  """(config, params) of the latest (or the given) checkpoint in `workdir`.

  `spec.load_workdir` without the spec; the model for decoding is
  `model_from_config(config, 'predict')`. Raises `ConfigError` when
  `config.json`'s model is not valid.
  """
  with config_lib.model_errors():
    config, _, params = spec_lib.load_workdir(workdir, step)
  return config, params


class InitFromError(ValueError):
  """`config.init_from` names parameters that cannot initialise this model."""


def load_matching_params(workdir: str, params, *, field: str = 'init_from'):
  """(params, report): `params` with every leaf that `workdir`'s latest checkpoint also has.

  Leaves are matched by their path in the parameter tree ('Repeat_3/.../kernel').
  A matching leaf takes the checkpoint's value (placed like the leaf it
  replaces when that is an array); the others are kept as they are, so
  `params` may be abstract (`jax.ShapeDtypeStruct`s): the trainer checks and
  loads before compiling anything. `report` has the step and the matched,
  fresh and unused paths. Raises `InitFromError` when
  no path matches, or when a path matches with a different shape or dtype
  (the models disagree; nothing is loaded).
  """
  source_config, source = load_for_inference(workdir)
  manager = workdir_lib.make_manager(workdir, read_only=True, async_save=False)
  step = manager.latest_step()
  manager.close()
  flat_source = {optimizers.path_name(p): x
                 for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  matched, fresh, values, mismatched = [], [], [], []
  for path, leaf in leaves:
    name = optimizers.path_name(path)
    if name not in flat_source:
      fresh.append(name)
      values.append(leaf)
      continue
    value = flat_source[name]
    if value.shape != leaf.shape or value.dtype != leaf.dtype:
      mismatched.append(f'{name}: checkpoint {value.dtype}{tuple(value.shape)}, model '
                        f'{leaf.dtype}{tuple(leaf.shape)}')
      continue
    matched.append(name)
    values.append(jax.device_put(value, leaf.sharding) if isinstance(leaf, jax.Array) else value)
  source_name = source_config.model.get('name', '?')
  if mismatched:
    raise InitFromError(
        f'config.{field}={workdir!r} ({source_name}) has {len(mismatched)} parameter(s) whose '
        f'shape or dtype differs from this model\'s: ' + '; '.join(mismatched[:4])
        + ('; ...' if len(mismatched) > 4 else '') + '. The two models must agree on the '
        'shared layers (d_model, d_ff, n_heads, vocab_size, ...).')
  if not matched:
    raise InitFromError(
        f'config.{field}={workdir!r} ({source_name}) shares no parameter path with this model; '
        f'its paths look like {", ".join(sorted(flat_source)[:3])}, this model\'s like '
        f'{", ".join(fresh[:3])}.')
  unused = sorted(set(flat_source) - set(matched))
  report = {'step': step, 'matched': matched, 'fresh': fresh, 'unused': unused}
  return jax.tree_util.tree_unflatten(treedef, values), report


def model_from_config(config: ml_collections.ConfigDict, mode: str):
  """The model `config.model` describes, built in `mode` (`ModelSpec.from_config(...).build`)."""
  return config_lib.model_spec(config).build(mode)
