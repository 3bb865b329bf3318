"""Decoding speed at batch 1 on the CPU: dense vs sparse, per layer and per model.

Prints two markdown tables.

1. Per-token latency of one feed-forward layer: dense FF vs `SparseFF`. Each
   layer runs in `'predict'` mode on one token (batch 1, length 1), jitted,
   parameters passed as arguments (not baked in as constants); the figure is
   the median wall time of many interleaved calls after warm-up. Issue 7 asks
   for SparseFF at n_elements_in_block=32 to be >= 5x faster per token than
   the dense FF of the same size (d_model 1024, d_ff 16384).
2. Whole-model decoding tokens/s: `TransformerLM` vs `TerraformerLM` of the
   same size (d_model 1024, d_ff 16384, 6 layers, 16 heads): the Terraformer
   with SparseFF (n_elements_in_block 32) and sparse QKV, the SparseFF-only
   variant (full attention), and the Terraformer wiring with dense FF and
   full attention. Each model generates `--new_tokens` tokens after a
   one-token prompt with `terraflax.decoding.autoregressive_sample` (greedy,
   one jitted while-loop; compiled first, then the median of `--repeats`
   timed runs). Issue 7 asks for the Terraformer to decode >= 2x faster than
   the dense model.

  python benchmarks/sparse_decoding.py [--d_model 1024 --d_ff 16384 --blocks 32 --calls 300]
  python benchmarks/sparse_decoding.py --skip_layers --n_layers 6 --new_tokens 64
"""

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

import terraflax.combinators as cb
import terraflax.decoding as decoding
import terraflax.layers as tl
import terraflax.models as tm


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


def layer_table(args):
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


def model_variants(args):
  """(name, factory, keyword arguments) of the models to compare, all of one size."""
  size = dict(vocab_size=args.vocab_size, d_model=args.d_model, d_ff=args.d_ff,
              n_layers=args.n_layers, n_heads=args.n_heads, dropout=0.0,
              max_len=args.new_tokens + 1)
  sparse_ff = dict(ff_sparsity=args.model_block, ff_d_lowrank=args.d_lowrank)
  return [
      ('TransformerLM (dense)', tm.TransformerLM, size),
      ('TerraformerLM: SparseFF + sparse QKV', tm.TerraformerLM,
       dict(size, attention={'kind': 'sparse_qkv'}, **sparse_ff)),
      ('TerraformerLM: SparseFF only', tm.TerraformerLM,
       dict(size, attention={'kind': 'full'}, **sparse_ff)),
      ('TerraformerLM wiring, dense FF + full attention', tm.TerraformerLM,
       dict(size, attention={'kind': 'full'}, ff_sparsity=0)),
  ]


def time_decoding(factory, kwargs, args):
  """(params, seconds per run of `new_tokens` greedy tokens: median, all runs)."""
  model = factory(mode='predict', **kwargs)
  first = jnp.zeros((1, 1), jnp.int32)
  params = jax.jit(lambda key: factory(mode='eval', **kwargs).init(key, first)['params'])(
      jax.random.key(0))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

  def run():
    return decoding.autoregressive_sample(model, params, None, args.new_tokens, temperature=0.0,
                                          batch_size=1).block_until_ready()

  run()  # Compiles.
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  del params
  gc.collect()
  return n_params, float(np.median(times)), times


def model_table(args):
  rows = []
  for name, factory, kwargs in model_variants(args):
    n_params, seconds, times = time_decoding(factory, kwargs, args)
    rows.append((name, n_params, seconds, times))
    print(f'  {name}: {[f"{t:.2f}" for t in times]} s per {args.new_tokens} tokens', flush=True)
  print(f'jax {jax.__version__}, backend {jax.default_backend()}; batch 1, greedy '
        f'autoregressive_sample of {args.new_tokens} tokens after a 1-token prompt (compiled '
        f'first; median of {args.repeats} runs); d_model {args.d_model}, d_ff {args.d_ff}, '
        f'{args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab_size}; SparseFF '
        f'n_elements_in_block {args.model_block}, d_lowrank {args.d_lowrank}')
  print('| model | params (M) | tokens / s | ms / token | speedup vs dense |')
  print('|---|---|---|---|---|')
  dense = rows[0][2]
  for name, n_params, seconds, _ in rows:
    print(f'| {name} | {n_params / 1e6:.1f} | {args.new_tokens / seconds:.1f} | '
          f'{seconds / args.new_tokens * 1e3:.2f} | {dense / seconds:.1f}x |')


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--d_model', type=int, default=1024)
  parser.add_argument('--d_ff', type=int, default=16384)
  parser.add_argument('--blocks', default='32', help='comma-separated n_elements_in_block values')
  parser.add_argument('--d_lowrank', type=int, default=64)
  parser.add_argument('--calls', type=int, default=300)
  parser.add_argument('--skip_layers', action='store_true', help='only the model table')
  parser.add_argument('--skip_models', action='store_true', help='only the layer table')
  parser.add_argument('--n_layers', type=int, default=6)
  parser.add_argument('--n_heads', type=int, default=16)
  parser.add_argument('--vocab_size', type=int, default=256)
  parser.add_argument('--model_block', type=int, default=32,
                      help='n_elements_in_block of the models\' SparseFF')
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  if not args.skip_layers:
    layer_table(args)
  if not args.skip_models:
    model_table(args)


if __name__ == '__main__':
  main()
