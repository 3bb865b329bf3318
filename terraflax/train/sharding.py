"""The device mesh, parameter and batch shardings, and multi-process start.

One `jax.sharding.Mesh` over all devices with axes ('data', 'model'):
batches are split along their leading axis over 'data'; parameters are
replicated unless the model annotates them with logical axis names
(`nn.with_logical_partitioning`) and `config.sharding.logical_axis_rules` maps
a name to 'model' (or 'data'). The same code runs on 1 CPU, 8 forced CPU
devices, a GPU host or a TPU pod slice.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = 'data', 'model'


def maybe_initialize_distributed(distributed_config) -> None:
  """`jax.distributed.initialize()` when `config.distributed.initialize` is set.

  Empty/zero/-1 fields are left for JAX to detect (TPU pods, SLURM, ...).
  Must run before anything touches the devices.
  """
  if not distributed_config.initialize:
    return
  kwargs = {}
  if distributed_config.coordinator_address:
    kwargs['coordinator_address'] = distributed_config.coordinator_address
  if distributed_config.num_processes:
    kwargs['num_processes'] = distributed_config.num_processes
  if distributed_config.process_id >= 0:
    kwargs['process_id'] = distributed_config.process_id
  jax.distributed.initialize(**kwargs)


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
  """A (n_devices // model_parallel, model_parallel) mesh named ('data', 'model')."""
  devices = jax.devices() if devices is None else devices
  if len(devices) % model_parallel:
    raise ValueError(f'sharding.model_parallel={model_parallel} must divide the '
                     f'{len(devices)} devices.')
  grid = np.asarray(devices).reshape(len(devices) // model_parallel, model_parallel)
  return Mesh(grid, (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA))


def variable_shardings(abstract_variables, mesh: Mesh, rules=()):
  """Shardings for a (possibly `nn.Partitioned`-boxed) variable tree, unboxed.

  Leaves without logical axis names are replicated; named axes follow
  `rules` ((logical_name, mesh_axis or None), ...); names without a rule are
  replicated.
  """
  rules = tuple((name, axis) for name, axis in rules)
  specs = nn.get_partition_spec(abstract_variables)
  known = {name for name, _ in rules}

  def to_mesh(spec):
    if not isinstance(spec, P):
      return replicated(mesh)
    axes = tuple(dict(rules).get(name) if name in known else None
                 for name in spec) if rules else tuple(
                     None if name not in (DATA, MODEL) else name for name in spec)
    return NamedSharding(mesh, P(*axes))

  return jax.tree_util.tree_map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch, as global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
