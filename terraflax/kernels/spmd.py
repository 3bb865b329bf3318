"""Native custom calls split over batch, heads or hidden width under a device mesh.

XLA has no partitioning rule for a custom call, so without help every
device would gather the whole batch and run the whole kernel. `partitioned`
wraps a kernel call with `jax.experimental.custom_partitioning`: the call's
operands and results are described by layouts, one letter per dimension,

  'b': the batch (or rows = batch * length), split like the caller's batch;
  'h': heads, split like the caller's heads;
  'f': a hidden width that the call contracts (the feed-forward d_ff),
       split like the caller's weights;
  '.': anything else (length, widths, rounds): whole on every device.

Under a mesh each device then runs the kernel on its own shard. A result
that lacks a split letter of its operands is a partial sum over that
letter's shards (a weight gradient summed over the rows, an output
contracted over the hidden width) and is summed over those mesh axes
(`psum`), unless `same_over` says the call computes it whole on every shard;
an operand listed in `once` (a bias added after the contraction) is given
to the first of those shards only. Operands beyond the given layouts default
to `BATCH_LEADING` (batch first, the rest whole), so one more per-example
operand (segment ids, say) needs no new rule. With one device, or under
`shard_map` (manual axes), the kernel runs as it is.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The layout letters that may be split over mesh axes, in the order they claim axes.
SPLIT = ('b', 'h', 'f')
BATCH_LEADING = 'b'  # with '.' for every further dimension


def _full(layout: str, rank: int) -> str:
  """`layout` for an array of `rank` dimensions: the default fills '.' after a leading 'b'."""
  if len(layout) == rank:
    return layout
  if layout == BATCH_LEADING and rank >= 1:
    return BATCH_LEADING + '.' * (rank - 1)
  raise ValueError(f'kernel layout {layout!r} does not fit an operand of rank {rank}.')


def _sharding_rule(operands: Sequence[str], results: Sequence[str]) -> tuple[str, tuple[str, ...]]:
  """Shardy's einsum-like rule: split letters pass through, every other dimension is replicated."""
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


def _split_axes(operands: Sequence[str], shardings, shapes, mesh: Mesh,
                multiple_of: dict[str, int]) -> dict[str, tuple[str, ...]]:
  """For each split letter, the mesh axes that the first operand sharding it uses.

  Axes already taken by an earlier letter (batch, then heads, then hidden)
  are dropped, and so are all of a letter's axes when its shards would not
  be a multiple of `multiple_of[letter]` (the dimension is then whole).
  """
  taken, chosen = set(), {}
  for letter in SPLIT:
    axes, size = (), 1
    for layout, sharding, shape in zip(operands, shardings, shapes):
      if letter in layout and isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(layout) - len(sharding.spec))
        axes = _axes_of(spec[layout.index(letter)])
        size = shape[layout.index(letter)]
        if axes:
          break
    axes = tuple(a for a in axes if a not in taken)
    shards = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    if size % shards or (size // shards) % multiple_of.get(letter, 1):
      axes = ()
    chosen[letter] = axes
    taken.update(axes)
  return chosen


def _named(mesh: Mesh, shardings) -> Mesh:
  """`mesh`, or where the shardings carry no axis names, a mesh over which all is replicated."""
  if not mesh.empty:
    return mesh
  devices = sorted(shardings[0].device_set, key=lambda d: d.id)
  return Mesh(np.array(devices), ('replicated',))


def _spec(layout: str, axes: dict[str, tuple[str, ...]]) -> PartitionSpec:
  return PartitionSpec(*[(axes[l] or None) if l in SPLIT else None for l in layout])


def partitioned(call: Callable, *, operands: Sequence[str], results: Sequence[str],
                same_over: dict[int, str] | None = None, once: Sequence[int] = (),
                multiple_of: dict[str, int] | None = None):
  """`call` (arrays -> array or tuple of arrays) made to run per shard under a mesh.

  `operands`, `results`: one layout per array (see the module docstring);
  operands past the listed layouts default to `BATCH_LEADING`. `same_over`:
  result index -> the letters it lacks yet is not summed over (the call
  computes it whole on every shard of them). `once`: operand indices given
  only to the first shard of the letters some result is summed over (zeros
  elsewhere). `multiple_of`: letter -> a size each shard of it must be a
  multiple of, or that letter stays whole. `call` must compute its result
  shapes from its operands' shapes (it is traced again on the per-device
  shapes) and its static attributes must not depend on a split dimension's
  size. Returns a function of the same arrays.
  """
  results, same_over = tuple(results), dict(same_over or {})
  multiple_of = dict(multiple_of or {})

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

    def choose(mesh, arg_shapes):
      shardings = [a.sharding for a in arg_shapes]
      mesh = _named(mesh, shardings)
      return mesh, _split_axes(in_layouts, shardings, [a.shape for a in arg_shapes], mesh,
                               multiple_of)

    def partition(mesh, arg_shapes, result_shapes):
      del result_shapes
      mesh, axes = choose(mesh, arg_shapes)
      used = {l for layout in in_layouts for l in layout if l in SPLIT}
      summed = [sorted(used - set(r) - set(same_over.get(i, ''))) for i, r in enumerate(results)]
      sums = [tuple(a for l in letters for a in axes[l]) for letters in summed]
      first_only = tuple(dict.fromkeys(a for s in sums for a in s))

      def lower(*args):
        if once and first_only:
          first = jax.lax.axis_index(first_only) == 0
          args = [jnp.where(first, a, jnp.zeros_like(a)) if i in once else a
                  for i, a in enumerate(args)]
        out = run(*args)
        out = (out,) if single else out
        out = tuple(jax.lax.psum(o, s) if s else o for o, s in zip(out, sums))
        return out[0] if single else out

      result_shardings = [NamedSharding(mesh, _spec(r, axes)) for r in results]
      return (mesh, lower, result_shardings[0] if single else tuple(result_shardings),
              tuple(NamedSharding(mesh, _spec(l, axes)) for l in in_layouts))

    def infer(mesh, arg_shapes, result_shapes):  # the GSPMD partitioner's propagation
      del result_shapes
      mesh, axes = choose(mesh, arg_shapes)
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
