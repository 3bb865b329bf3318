"""Native custom calls split over batch (and heads) under a device mesh.

XLA has no partitioning rule for a custom call, so without help every
device would gather the whole batch and run the whole kernel. `partitioned`
wraps a kernel call with `jax.experimental.custom_partitioning`: the call's
operands and results are described by layouts, one letter per dimension,

  'b': the batch (or rows = batch * length), split like the caller's batch;
  'h': heads, split like the caller's heads;
  '.': anything else (length, widths, rounds, weights): whole on every device.

Under a mesh each device then runs the kernel on its own shard, and a result
without a split letter that its operands have (a weight gradient summed over
the rows) is summed over those mesh axes (`psum`). Operands beyond the given
layouts default to `BATCH_LEADING` (batch first, the rest whole), so one more
per-example operand (segment ids, say) needs no new rule. With one device,
or under `shard_map` (manual axes), the kernel runs as it is.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The layout letters that may be split over mesh axes, in the order they claim axes.
SPLIT = ('b', 'h')
BATCH_LEADING = 'b'  # with '.' for every further dimension


def _full(layout: str, rank: int) -> str:
  """`layout` for an array of `rank` dimensions: the default fills '.' after a leading 'b'."""
  if len(layout) == rank:
    return layout
  if layout == BATCH_LEADING and rank >= 1:
    return BATCH_LEADING + '.' * (rank - 1)
  raise ValueError(f'kernel layout {layout!r} does not fit an operand of rank {rank}.')


def _sharding_rule(operands: Sequence[str], results: Sequence[str]) -> tuple[str, tuple[str, ...]]:
  """Shardy's einsum-like rule: 'b' and 'h' pass through, every other dimension is replicated."""
  fresh = (f'x{i}' for i in itertools.count())
  replicated = []

  def factors(layout):
    names = []
    for letter in layout:
      if letter in SPLIT:
        names.append(letter)
      else:
        names.append(next(fresh))
        replicated.append(names[-1])
    return ' '.join(names)

  text = ', '.join(factors(l) for l in operands) + ' -> ' + ', '.join(factors(l) for l in results)
  return text, tuple(replicated)


def _axes_of(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, tuple) else (spec_entry,)


def _split_axes(operands: Sequence[str], shardings) -> dict[str, tuple[str, ...]]:
  """For each split letter, the mesh axes that the first operand sharding it uses.

  Axes already taken by an earlier letter (batch before heads) are dropped.
  """
  taken, chosen = set(), {}
  for letter in SPLIT:
    axes = ()
    for layout, sharding in zip(operands, shardings):
      if letter in layout and isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(layout) - len(sharding.spec))
        axes = _axes_of(spec[layout.index(letter)])
        if axes:
          break
    chosen[letter] = tuple(a for a in axes if a not in taken)
    taken.update(chosen[letter])
  return chosen


def _named(mesh: Mesh, shardings) -> Mesh:
  """`mesh`, or where the shardings carry no axis names, a mesh over which all is replicated."""
  if not mesh.empty:
    return mesh
  devices = sorted(shardings[0].device_set, key=lambda d: d.id)
  return Mesh(np.array(devices), ('replicated',))


def _spec(layout: str, axes: dict[str, tuple[str, ...]]) -> PartitionSpec:
  return PartitionSpec(*[(axes[l] or None) if l in SPLIT else None for l in layout])


def partitioned(call: Callable, *, operands: Sequence[str], results: Sequence[str]):
  """`call` (arrays -> array or tuple of arrays) made to run per shard under a mesh.

  `operands`, `results`: one layout per array (see the module docstring);
  operands past the listed layouts default to `BATCH_LEADING`. `call` must
  compute its result shapes from its operands' shapes (it is traced again on
  the per-device shapes) and its static attributes must not depend on a split
  dimension's size. Returns a function of the same arrays.
  """
  results = tuple(results)

  def layouts_of(arrays):
    given = tuple(operands) + (BATCH_LEADING,) * max(0, len(arrays) - len(operands))
    return tuple(_full(l, a.ndim) for l, a in zip(given, arrays))

  def wrapped(*arrays):
    in_layouts = layouts_of(arrays)
    rule, replicated = _sharding_rule(in_layouts, results)
    single = len(results) == 1

    def run(*args):
      out = call(*args)
      return out if single else tuple(out)

    def partition(mesh, arg_shapes, result_shapes):
      del result_shapes
      shardings = [a.sharding for a in arg_shapes]
      mesh = _named(mesh, shardings)
      axes = _split_axes(in_layouts, shardings)
      arg_specs = [_spec(l, axes) for l in in_layouts]
      # Results drop the split letters they lack; those are summed over their axes.
      used = {l for layout in in_layouts for l in layout if l in SPLIT}
      sums = [tuple(a for l in sorted(used - set(r)) for a in axes[l]) for r in results]

      def lower(*args):
        out = run(*args)
        out = (out,) if single else out
        out = tuple(jax.lax.psum(o, s) if s else o for o, s in zip(out, sums))
        return out[0] if single else out

      result_shardings = [NamedSharding(mesh, _spec(r, axes)) for r in results]
      return (mesh, lower, result_shardings[0] if single else tuple(result_shardings),
              tuple(NamedSharding(mesh, s) for s in arg_specs))

    def infer(mesh, arg_shapes, result_shapes):  # the GSPMD partitioner's propagation
      del result_shapes
      shardings = [a.sharding for a in arg_shapes]
      mesh = _named(mesh, shardings)
      axes = _split_axes(in_layouts, shardings)
      out = [NamedSharding(mesh, _spec(r, axes)) for r in results]
      return out[0] if single else tuple(out)

    function = custom_partitioning(run)
    function.def_partition(partition, infer_sharding_from_operands=infer,
                           sharding_rule=rule, need_replication_factors=replicated)
    return _sequential_vmap(function)(*arrays)

  return wrapped


def _sequential_vmap(function):
  """`function` whose `vmap` runs it once per element (`lax.map`), as the FFI's 'sequential'.

  (`custom_partitioning` has no batching rule of its own.)
  """
  batched_function = jax.custom_batching.custom_vmap(function)

  @batched_function.def_vmap
  def _rule(axis_size, in_batched, *args):
    del axis_size

    def one(slices):
      rest = iter(slices)
      return batched_function(*[next(rest) if b else a for a, b in zip(args, in_batched)])

    out = jax.lax.map(one, [a for a, b in zip(args, in_batched) if b])
    return out, jax.tree.map(lambda _: True, out)

  return batched_function
