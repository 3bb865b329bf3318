"""Per-token decode latency: dense feed-forward vs `SparseFF` (batch 1, CPU).

Prints a markdown table. Each layer runs in `'predict'` mode on one token
(batch 1, length 1), jitted, parameters passed as arguments (not baked in as
constants); the figure is the median wall time of many calls after warm-up.
Issue 7 asks for SparseFF at n_elements_in_block=32 to be >= 5x faster per
token than the dense FF of the same size (d_model 1024, d_ff 16384).

  python benchmarks/sparse_decoding.py [--d_model 1024 --d_ff 16384 --blocks 32 --calls 300]
"""

import argparse
import time

import jax
import numpy as np

import terraflax.combinators as cb
import terraflax.layers as tl


def build_dense(d_model: int, d_ff: int):
  """Dense(d_ff) -> Relu -> Dense(d_model): `tl.FeedForward` without its norm and dropout."""
  return cb.Serial(tl.Dense(d_ff), tl.Relu(), tl.Dense(d_model))


def build_sparse(d_model: int, d_ff: int, n_elements_in_block: int, d_lowrank: int):
  del d_model
  return tl.SparseFF(d_ff=d_ff, n_elements_in_block=n_elements_in_block, d_lowrank=d_lowrank,
                     mode='predict')


def prepare(layer, d_model: int, warmup: int = 10):
  """A jitted one-token call of `layer` on its own variables, warmed up; and its size."""
  x = jax.random.normal(jax.random.key(1), (1, 1, d_model))
  variables = layer.init(jax.random.key(0), x)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables['params']))
  step = jax.jit(layer.apply)
  for _ in range(warmup):
    step(variables, x).block_until_ready()
  return (lambda x: step(variables, x).block_until_ready()), n_params


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--d_model', type=int, default=1024)
  parser.add_argument('--d_ff', type=int, default=16384)
  parser.add_argument('--blocks', default='32', help='comma-separated n_elements_in_block values')
  parser.add_argument('--d_lowrank', type=int, default=64)
  parser.add_argument('--calls', type=int, default=300)
  args = parser.parse_args()

  blocks = [int(b) for b in args.blocks.split(',')]
  layers = [('dense FF', '-', build_dense(args.d_model, args.d_ff))]
  layers += [('SparseFF', n, build_sparse(args.d_model, args.d_ff, n, args.d_lowrank))
             for n in blocks]
  prepared = [prepare(layer, args.d_model) for _, _, layer in layers]
  xs = [jax.random.normal(jax.random.key(2 + i), (1, 1, args.d_model)) for i in range(16)]
  # Calls are interleaved (one of each layer per round), so load from other
  # processes on a shared machine affects every layer alike.
  times = np.zeros((len(layers), args.calls))
  for i in range(args.calls):
    for j, (call, _) in enumerate(prepared):
      start = time.perf_counter()
      call(xs[i % len(xs)])
      times[j, i] = time.perf_counter() - start
  medians = np.median(times, axis=1)

  print(f'jax {jax.__version__}, backend {jax.default_backend()}; one token (batch 1, '
        f'length 1), predict mode, jitted, median of {args.calls} interleaved calls; '
        f'd_model {args.d_model}, d_ff {args.d_ff}, d_lowrank {args.d_lowrank}')
  print('| layer | n_elements_in_block | params (M) | ms / token (median) | p10 - p90 | '
        'speedup vs dense |')
  print('|---|---|---|---|---|---|')
  for j, ((name, n, _), (_, n_params)) in enumerate(zip(layers, prepared)):
    lo, hi = np.percentile(times[j], [10, 90]) * 1e3
    print(f'| {name} | {n} | {n_params / 1e6:.1f} | {medians[j] * 1e3:.3f} | '
          f'{lo:.3f} - {hi:.3f} | {medians[0] / medians[j]:.1f}x |')


if __name__ == '__main__':
  main()
