"""The training state: `TrainState`, its fresh initialisation and layout, parameter counts.

`initial_state` initialises the parameters with `stream_keys(init_key)` (the
'params' stream and the noise streams some layers draw at init) directly into
their shardings, and the optimizer state beside them (`opt_state_shardings`);
`abstract_state` is the same layout unallocated (a resume's restore target).
`memory_report` gives the per-device bytes of `WORKDIR/memory.json`.
The parameter counts (total, trained) go to `WORKDIR/parameters.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from terraflax import rng as rng_lib
from terraflax.train import config as config_lib
from terraflax.train import optimizers
from terraflax.train import sharding as sharding_lib

PARAMETERS_FILE = 'parameters.json'
MEMORY_FILE = 'memory.json'


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 (): optimizer updates applied so far.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32 (2,) key data; step s draws from fold_in(rng, s).


def opt_state_shardings(tx, params, mesh):
  """Optimizer-state shardings: param-shaped leaves follow their parameter, the rest replicate.

  A state leaf follows the parameter whose path ends its own path (Adam's
  `mu['Dense_5']['kernel']` follows `Dense_5/kernel`) when their shapes agree.
  Matching paths rather than tree structures also covers masked states
  (`optax.multi_transform` for frozen parameters), whose subtrees hold
  placeholders where parameters are frozen.
  """
  replicated = sharding_lib.replicated(mesh)
  abstract = jax.eval_shape(tx.init, params)
  by_path = {tuple(optimizers.path_name(p).split('/')): x
             for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  longest = max((len(k) for k in by_path), default=0)

  def follow(path, leaf):
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    for start in range(max(len(keys) - longest, 0), len(keys)):
      param = by_path.get(keys[start:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated

  return jax.tree_util.tree_map_with_path(follow, abstract)


def initial_state(experiment: config_lib.Experiment, tx, mesh, loaded=None) -> TrainState:
  """Freshly initialised parameters and optimizer state, laid out on `mesh`.

  `loaded` (from `checkpoint.load_matching_params` on the abstract parameters)
  replaces the parameters it holds arrays for; its `ShapeDtypeStruct` leaves
  keep their fresh initialisation.
  """
  config, spec = experiment.config, experiment.spec
  replicated = sharding_lib.replicated(mesh)
  rules = sharding_lib.axis_rules(config.sharding)
  param_shardings = sharding_lib.variable_shardings(
      experiment.abstract_variables['params'], mesh, rules)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))
  model = spec.build('train')
  tokens = spec.example_inputs(1, config.data.seq_len)

  def init_params(key):
    return nn.meta.unbox(model.init(rng_lib.stream_keys(key), *tokens)['params'])

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params = jax.jit(init_params, out_shardings=param_shardings)(init_key)
    if loaded is not None:
      params = jax.tree_util.tree_map(
          lambda new, fresh: fresh if isinstance(new, jax.ShapeDtypeStruct)
          else jax.device_put(new, fresh.sharding), loaded, params)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                    opt_state=opt_state,
                    rng=jax.device_put(jax.random.key_data(train_key), replicated))


def abstract_state(experiment: config_lib.Experiment, tx, mesh) -> TrainState:
  """The layout `initial_state` makes, as sharded `jax.ShapeDtypeStruct`s: nothing allocated.

  What a resumed run restores its checkpoint into (orbax reads each device's
  shards straight onto the mesh), so resuming never holds two states.
  """
  replicated = sharding_lib.replicated(mesh)
  boxed = experiment.abstract_variables['params']
  shardings = sharding_lib.variable_shardings(
      boxed, mesh, sharding_lib.axis_rules(experiment.config.sharding))
  params = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
      shardings)
  opt_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(tx.init, params), opt_state_shardings(tx, params, mesh))
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                    params=params, opt_state=opt_state,
                    rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated))


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def write_parameter_counts(workdir: str, n_params: int, n_trained: int, config,
                           init_report=None) -> None:
  """`WORKDIR/parameters.json`: total, trained and frozen counts, and what init_from loaded."""
  record = {'total': n_params, 'trained': n_trained, 'frozen': n_params - n_trained,
            'trainable': config.optimizer.trainable, 'init_from': config.init_from}
  if init_report is not None:
    record['init_from_step'] = init_report['step']
    record['init_from_loaded'] = len(init_report['matched'])
    record['init_from_fresh'] = init_report['fresh']
  with open(os.path.join(workdir, PARAMETERS_FILE), 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)
    f.write('\n')


def memory_report(state: TrainState, compiled_step, mesh) -> dict[str, Any]:
  """Per-device bytes of the parameters, optimizer state and the compiled step's temporaries.

  Parameter and optimizer bytes are those of the largest device's shards;
  `*_replicated` are one whole copy; the temp, argument and output bytes are
  XLA's `memory_analysis()` of the compiled step (None where the backend
  has none).
  """
  try:
    analysis = compiled_step.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    analysis = None
  compiled = {name: getattr(analysis, f'{name}_size_in_bytes', None) if analysis else None
              for name in ('temp', 'argument', 'output', 'generated_code')}
  return {
      'mesh': {name: int(size) for name, size in mesh.shape.items()},
      'devices': int(mesh.size),
      'params_bytes_per_device': sharding_lib.per_device_bytes(state.params),
      'opt_state_bytes_per_device': sharding_lib.per_device_bytes(state.opt_state),
      'params_bytes_replicated': sharding_lib.total_bytes(state.params),
      'opt_state_bytes_replicated': sharding_lib.total_bytes(state.opt_state),
      **{f'{name}_bytes_per_device': value for name, value in compiled.items()},
  }


def write_memory_report(workdir: str, report: dict[str, Any]) -> None:
  """`WORKDIR/memory.json`: `memory_report`'s figures."""
  with open(os.path.join(workdir, MEMORY_FILE), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
    f.write('\n')
