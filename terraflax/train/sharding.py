"""The device mesh, parameter and batch shardings, their checks, and multi-process start.

One `jax.sharding.Mesh` over all devices with axes ('data', 'fsdp', 'model'),
of sizes (devices / (fsdp * tensor_parallel), `config.sharding.fsdp`,
`config.sharding.tensor_parallel`):

  data    pure data parallelism: parameters replicated, the batch split
  fsdp    the batch split too, and every parameter's 'embed' axis split
          (ZeRO-3: inside a scanned stack each layer's slice is gathered
          when it is used, and its gradient reduce-scattered)
  model   tensor parallelism: 'heads', 'mlp', 'vocab' and 'modules' split

Layers name their parameters' axes (`nn.with_logical_partitioning`) and pin
their main activations (`nn.with_logical_constraint`) with logical names;
`axis_rules(config.sharding)` maps each name to mesh axes (`DEFAULT_RULES`,
overridden name by name by `config.sharding.logical_axis_rules`). A name
without a rule, and a parameter without names, is replicated. Batches are
split along their leading axis over ('data', 'fsdp').

`check_variables` refuses, before anything compiles, a parameter whose
width does not divide the mesh axes it is split over, naming the model field
(`model.d_ff=6 is not divisible by sharding.tensor_parallel=4`) where it can.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from terraflax import errors

DATA, FSDP, MODEL = 'data', 'fsdp', 'model'
MESH_AXES = (DATA, FSDP, MODEL)
BATCH_AXES = (DATA, FSDP)

# (logical axis name, mesh axis | tuple of mesh axes | None), the shared decisions of issue 20.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', FSDP),
    ('vocab', MODEL),
    ('heads', MODEL),
    ('mlp', MODEL),
    ('modules', MODEL),
    ('length', None),
    ('head_dim', None),
    ('layers', None),
    ('controller', None),
    ('kernel', None),
)

# The config field a parameter axis of each logical name is sized by (first match in
# config.model whose value equals the axis' size): what a divisibility error names.
MODEL_FIELDS = {
    'embed': ('d_model',),
    'mlp': ('d_ff',),
    'heads': ('n_heads',),
    'vocab': ('vocab_size',),
    'modules': ('n_modules', 'sparse_modules', 'n_blocks', 'ff_n_blocks'),
    'head_dim': ('d_head', 'd_qk', 'd_v'),
    'layers': ('n_layers',),
}
# The config field that sizes each mesh axis.
AXIS_FIELDS = {DATA: 'the data-parallel devices', FSDP: 'sharding.fsdp',
               MODEL: 'sharding.tensor_parallel'}


class ShardingError(errors.UserError, ValueError):
  """A sharding setting does not fit the devices or the model (printed as one line)."""


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


def tensor_parallel(sharding_config) -> int:
  """`sharding.tensor_parallel`, or the deprecated `sharding.model_parallel` when only it is set.

  `model_parallel` (0: unset) warns with a DeprecationWarning; both set to
  different sizes above 1 is a `ShardingError`.
  """
  tp = int(sharding_config.get('tensor_parallel', 1))
  old = int(sharding_config.get('model_parallel', 0) or 0)
  if old:
    warnings.warn('config.sharding.model_parallel is deprecated: use '
                  'config.sharding.tensor_parallel (the same mesh axis).', DeprecationWarning,
                  stacklevel=2)
  if old > 1:
    if tp not in (1, old):
      raise ShardingError(f'config.sharding.model_parallel={old} (deprecated) and '
                          f'sharding.tensor_parallel={tp} disagree; set only tensor_parallel.')
    return old
  return tp


def mesh_shape(sharding_config, n_devices: int) -> dict[str, int]:
  """{'data': d, 'fsdp': f, 'model': t} for `n_devices`; `ShardingError` if f * t does not divide."""
  fsdp, tp = int(sharding_config.get('fsdp', 1)), tensor_parallel(sharding_config)
  old = int(sharding_config.get('model_parallel', 0) or 0)
  tp_field = ('sharding.model_parallel' if old > 1 and old == tp
              and int(sharding_config.get('tensor_parallel', 1)) == 1
              else 'sharding.tensor_parallel')
  if fsdp < 1 or tp < 1:
    raise ShardingError(f'config.sharding.fsdp={fsdp} and {tp_field}={tp} must be '
                        'positive ints.')
  if n_devices % (fsdp * tp):
    raise ShardingError(
        f'config.sharding.fsdp={fsdp} x {tp_field}={tp} = {fsdp * tp} must divide '
        f'the number of devices ({n_devices}).')
  return {DATA: n_devices // (fsdp * tp), FSDP: fsdp, MODEL: tp}


def make_mesh(fsdp: int = 1, tensor_parallel: int = 1, devices=None) -> Mesh:  # pylint: disable=redefined-outer-name
  """A (data, fsdp, model) mesh over `devices` (default all), data = devices / (fsdp * tp).

  Devices are laid out in order, 'model' fastest: the tensor-parallel groups
  are neighbouring devices (and, over several processes, a process's own).
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape({'fsdp': fsdp, 'tensor_parallel': tensor_parallel}, len(devices))
  grid = np.asarray(devices).reshape(shape[DATA], shape[FSDP], shape[MODEL])
  return Mesh(grid, MESH_AXES)


def mesh_from_config(sharding_config, devices=None) -> Mesh:
  """`make_mesh` with `config.sharding`'s fsdp and tensor_parallel (or model_parallel)."""
  return make_mesh(int(sharding_config.get('fsdp', 1)), tensor_parallel(sharding_config),
                   devices)


def axis_rules(sharding_config=None) -> tuple[tuple[str, Any], ...]:
  """`DEFAULT_RULES` with `config.sharding.logical_axis_rules` replacing the names it lists.

  A rule is (logical name, mesh axis | tuple of mesh axes | None); new names
  are appended. The result is what `nn.logical_axis_rules` takes.
  """
  overrides = tuple(sharding_config.get('logical_axis_rules', ())) if sharding_config else ()
  table = dict(DEFAULT_RULES)
  for name, axes in overrides:
    table[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(table.items())


def check_rules(rules) -> None:
  """`ShardingError` unless every rule is (name, None | mesh axis | tuple of mesh axes)."""
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    if ok:
      axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
      ok = rule[1] is None or all(a in MESH_AXES for a in axes)
    if not ok:
      raise ShardingError(
          'config.sharding.logical_axis_rules must be pairs (logical_name, None | '
          f"'data' | 'fsdp' | 'model' | a tuple of them), got {rule!r}.")


def _mesh_axes(names: Sequence[str | None], rules) -> tuple:
  """Mesh axes of each logical name; a mesh axis already used by an earlier dim is dropped."""
  table = dict(rules)
  used, out = set(), []
  for name in names:
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return tuple(out)


def logical_names(abstract_variables):
  """The tree of logical axis names (a tuple per leaf, None where a leaf has none)."""
  specs = nn.get_partition_spec(abstract_variables)
  return jax.tree_util.tree_map(lambda s: tuple(s) if isinstance(s, P) else None, specs,
                                is_leaf=lambda x: isinstance(x, P) or x is None)


def variable_shardings(abstract_variables, mesh: Mesh, rules=DEFAULT_RULES):
  """`NamedSharding`s for a (possibly `nn.Partitioned`-boxed) variable tree, unboxed.

  Named axes follow `rules`; leaves without names, and names without a rule,
  are replicated, except that with fsdp > 1 a parameter none of whose axes
  the rules put on 'fsdp' is split over 'fsdp' along its largest free
  dimension that divides by it ('layers' excepted: a scanned stack gathers one
  layer at a time), so fsdp=N holds ~1/N of every sizeable parameter (a sparse
  controller, a convolution's taps) and not only the 'embed'-named ones.
  """
  fsdp = dict(mesh.shape).get(FSDP, 1)
  specs = nn.get_partition_spec(abstract_variables)
  flat_specs, treedef = jax.tree_util.tree_flatten(
      specs, is_leaf=lambda x: isinstance(x, P) or x is None)
  shapes = jax.tree_util.tree_leaves(nn.meta.unbox(abstract_variables))
  shardings = []
  for spec, leaf in zip(flat_specs, shapes):
    names = tuple(spec) if isinstance(spec, P) else (None,) * len(leaf.shape)
    axes = list(_mesh_axes(names, rules))
    if fsdp > 1:
      axes = _fsdp_fallback(axes, names, leaf.shape, dict(mesh.shape))
    shardings.append(NamedSharding(mesh, P(*axes)))
  return jax.tree_util.tree_unflatten(treedef, shardings)


def _fsdp_fallback(axes: list, names: tuple, shape: tuple, sizes: dict[str, int]) -> list:
  """`axes` with FSDP on the largest free dimension divisible by it, unless FSDP is used.

  A dimension is free when no mesh axis splits it (none, or axes of size 1).
  """
  as_tuple = lambda x: () if x is None else (x,) if isinstance(x, str) else tuple(x)
  if any(FSDP in as_tuple(x) for x in axes):
    return axes
  fsdp = sizes[FSDP]
  free = [d for d, size in enumerate(shape)
          if math.prod(sizes[a] for a in as_tuple(axes[d])) == 1 and names[d] != 'layers'
          and size % fsdp == 0]
  if free:
    axes[max(free, key=lambda d: shape[d])] = FSDP
  return axes


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def check_variables(abstract_variables, mesh_sizes: dict[str, int], rules=DEFAULT_RULES,
                    model_config=None) -> None:
  """`ShardingError` for the first parameter that cannot be split as `rules` ask.

  `mesh_sizes` is `mesh_shape(...)`'s {'data', 'fsdp', 'model'}. A split axis
  must divide by the product of its mesh axes' sizes; the error names the
  model field that sized it (`model.d_ff=6 is not divisible by
  sharding.tensor_parallel=4`) when `model_config` has one of that size, else
  the parameter path, shape and logical names. An axis smaller than the
  devices it is split over is "too small to split".
  """
  specs = nn.get_partition_spec(abstract_variables)
  shapes = nn.meta.unbox(abstract_variables)
  flat_specs = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, P) or x is None)[0]
  flat_shapes = jax.tree_util.tree_leaves(shapes)
  model = dict(model_config) if model_config is not None else {}
  for (path, spec), leaf in zip(flat_specs, flat_shapes):
    if not isinstance(spec, P):
      continue
    for dim, (name, axes) in enumerate(zip(tuple(spec), _mesh_axes(tuple(spec), rules))):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      size = math.prod(mesh_sizes[a] for a in axes)
      if size == 1 or leaf.shape[dim] % size == 0:
        continue
      over = ' x '.join(f'{AXIS_FIELDS[a]}={mesh_sizes[a]}' for a in axes if mesh_sizes[a] > 1)
      where = f'parameter {_path(path)} {tuple(leaf.shape)} with logical axes {tuple(spec)}'
      fields = [f for f in MODEL_FIELDS.get(name, ()) if model.get(f) == leaf.shape[dim]]
      fix = f'; choose sizes divisible by {size} or a smaller {over.split("=")[0]}'
      if fields:
        raise ShardingError(f'config.model.{fields[0]}={leaf.shape[dim]} is not divisible by '
                            f'{over} ({where}, axis {name!r}){fix}.')
      if leaf.shape[dim] < size:
        raise ShardingError(f'{where} is too small to split: its axis {name!r} has '
                            f'{leaf.shape[dim]} entries for {over}{fix}, or map {name!r} to '
                            'None in config.sharding.logical_axis_rules.')
      raise ShardingError(f'{where}: axis {name!r} of size {leaf.shape[dim]} is not divisible '
                          f'by {over}{fix}.')


def check_batch(batch_size: int, grad_accum_steps: int, mesh_sizes: dict[str, int],
                n_processes: int = 1) -> None:
  """`ShardingError` unless every (micro-)batch splits evenly over ('data', 'fsdp').

  The global micro-batch must divide by data * fsdp, and the processes (each
  reads its own rows) must each hold whole batch shards.
  """
  split = mesh_sizes[DATA] * mesh_sizes[FSDP]
  micro = batch_size // grad_accum_steps
  accum = (f' / train.grad_accum_steps={grad_accum_steps} = {micro}'
           if grad_accum_steps > 1 else '')
  if micro % split:
    raise ShardingError(
        f'config.train.batch_size={batch_size}{accum} must be divisible by the {split} devices '
        f'the batch is split over (data={mesh_sizes[DATA]} x sharding.fsdp={mesh_sizes[FSDP]}).')
  if split % n_processes:
    raise ShardingError(
        f'the batch is split over {split} devices (data={mesh_sizes[DATA]} x '
        f'sharding.fsdp={mesh_sizes[FSDP]}), which the {n_processes} processes cannot share '
        'evenly (each reads its own rows): lower config.sharding.tensor_parallel to at most '
        'the devices of one process.')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch, as global arrays split over ('data', 'fsdp')."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of (sharded) arrays or sharded `ShapeDtypeStruct`s: the
  largest over devices."""
  totals: dict[Any, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    sharding = getattr(x, 'sharding', None)
    itemsize = np.dtype(x.dtype).itemsize
    if sharding is None:
      totals[None] = totals.get(None, 0) + math.prod(x.shape) * itemsize
      continue
    shard = sharding.shard_shape(x.shape)
    for device in sharding.device_set:
      totals[device] = totals.get(device, 0) + math.prod(shard) * itemsize
  shared = totals.pop(None, 0)
  return shared + max(totals.values(), default=0)


def total_bytes(tree) -> int:
  """Bytes of a tree of arrays as one replicated copy."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(tree))
