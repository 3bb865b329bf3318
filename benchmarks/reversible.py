"""Training-step memory, step time and compile time vs depth: reversible vs plain.

Four stacks of the same attention + feed-forward blocks, n blocks deep:
  reversible       Dup, ReversibleSerial(half-residual blocks, n_repeats=n), MergeStreams
  rev. autodiff    the same with reversible=False (same parameters, all activations kept)
  plain            Repeat(pre-norm residual block, n)
  plain + remat    Repeat(pre-norm residual block, n, remat=True)
The attention is LSHSelfAttention (--attention lsh, 2 hash rounds) or
CausalAttention (--attention full). A training step is value_and_grad of a
loss on the stack's output. Memory is the compiled step's temp size
(`memory_analysis().temp_size_in_bytes`, no run needed); step time is the
median of a few executed steps (skipped when the step would need more than
--max_run_gib, or for depths not in --time_depths). Prints markdown tables.

  python benchmarks/reversible.py [--attention lsh|full] [--depths 2,6,12,24] [--batch 4]
      [--length 512]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl


def Mixer(kind: str, d_model: int, n_heads: int, chunk_len: int):  # pylint: disable=invalid-name
  """The token-mixing layer of every block: causal full or LSH attention, (b, l, d) -> (b, l, d)."""
  if kind == 'lsh':
    return tl.LSHSelfAttention(n_heads=n_heads, d_qk=d_model // n_heads, d_v=d_model // n_heads,
                               n_hashes=2, chunk_len=chunk_len, causal=True)
  return tl.CausalAttention(n_heads=n_heads, use_bias=False)


def make_stack(kind: str, depth: int, args):
  ff = lambda: tl.FeedForward(d_model=args.d_model, d_ff=args.d_ff, dropout=args.dropout)
  mixer = lambda: Mixer(args.attention, args.d_model, args.n_heads, args.chunk_len)
  if kind in ('reversible', 'rev. autodiff'):
    return cb.Serial(
        cb.Dup(),  # stack: x, x
        cb.ReversibleSerial(
            cb.ReversibleHalfResidual(tl.LayerNorm(), mixer(), tl.Dropout(args.dropout)),
            cb.ReversibleSwap(),
            cb.ReversibleHalfResidual(ff()),
            cb.ReversibleSwap(),
            n_repeats=depth, reversible=kind == 'reversible'),
        cb.MergeStreams('mean'))  # stack: (x1 + x2) / 2
  block = cb.Serial(
      cb.Residual(tl.LayerNorm(), mixer(), tl.Dropout(args.dropout)),
      cb.Residual(ff()))
  return cb.Repeat(block, depth, remat=kind == 'plain + remat')


def training_step(model):
  def loss(params, x, rng):
    y = model.apply({'params': params}, x, rngs={'dropout': rng, 'hash': rng})
    return jnp.mean(jnp.square(y))
  return jax.jit(jax.value_and_grad(loss))


def measure(kind, depth, args):
  """(temp MiB, compile s, compile CPU s, step ms or None) of one stack's training step.

  Compile times are the minimum over `args.compile_repeats` fresh compiles
  (wall clock, and CPU time of this process, which other load disturbs less).
  """
  model = make_stack(kind, depth, args)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.length, args.d_model))
  rng = jax.random.key(2)
  init_rngs = {'params': jax.random.key(0), 'hash': jax.random.key(3)}
  shapes = jax.eval_shape(model.init, init_rngs, x)['params']
  compile_s = compile_cpu_s = float('inf')
  for _ in range(args.compile_repeats):
    step = training_step(model)  # A fresh jit: nothing cached.
    start, start_cpu = time.perf_counter(), time.process_time()
    compiled = step.lower(shapes, x, rng).compile()
    compile_s = min(compile_s, time.perf_counter() - start)
    compile_cpu_s = min(compile_cpu_s, time.process_time() - start_cpu)
  temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
  step_ms = None
  if depth in args.time_depths and temp_mib < args.max_run_gib * 1024:
    params = jax.jit(model.init)(init_rngs, x)['params']
    jax.block_until_ready(compiled(params, x, rng))
    times = []
    for _ in range(args.steps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(params, x, rng))
      times.append(time.perf_counter() - start)
    step_ms = 1000 * statistics.median(times)
  return temp_mib, compile_s, compile_cpu_s, step_ms


KINDS = ('reversible', 'rev. autodiff', 'plain', 'plain + remat')


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--depths', default='2,6,12,24')
  parser.add_argument('--attention', default='lsh', choices=('lsh', 'full'),
                      help='LSHSelfAttention (2 hash rounds) or CausalAttention')
  parser.add_argument('--chunk_len', type=int, default=64, help='LSH chunk length')
  parser.add_argument('--time_depths', default=None, help='depths to time (default: all)')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--d_ff', type=int, default=1024)
  parser.add_argument('--n_heads', type=int, default=4)
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--compile_repeats', type=int, default=2)
  parser.add_argument('--max_run_gib', type=float, default=4.0,
                      help='do not execute steps whose temp memory exceeds this')
  parser.add_argument('--kinds', default=','.join(KINDS))
  args = parser.parse_args()
  depths = [int(d) for d in args.depths.split(',')]
  args.time_depths = depths if args.time_depths is None else [
      int(d) for d in args.time_depths.split(',') if d]
  kinds = [k for k in args.kinds.split(',') if k]
  results = {(k, d): measure(k, d, args) for d in depths for k in kinds}

  print(f'jax {jax.__version__}, backend {jax.default_backend()}; training step '
        f'(value_and_grad) of n blocks [{args.attention} attention + feed-forward], batch '
        f'{args.batch}, '
        f'length {args.length}, d_model {args.d_model}, d_ff {args.d_ff}, heads '
        f'{args.n_heads}, dropout {args.dropout}\n')
  print('Compiled temp memory (MiB)\n')
  print('| depth | ' + ' | '.join(kinds) + ' |')
  print('|---' * (len(kinds) + 1) + '|')
  for d in depths:
    print(f'| {d} | ' + ' | '.join(f'{results[k, d][0]:.0f}' for k in kinds) + ' |')
  print('\nGrowth vs the first depth (temp memory, compile CPU time)\n')
  print('| depth | ' + ' | '.join(f'{k} mem | {k} compile' for k in kinds) + ' |')
  print('|---' * (2 * len(kinds) + 1) + '|')
  for d in depths:
    cells = []
    for k in kinds:
      (m0, _, c0, _), (m, _, c, _) = results[k, depths[0]], results[k, d]
      cells += [f'{m / m0:.2f}x', f'{c / c0:.2f}x']
    print(f'| {d} | ' + ' | '.join(cells) + ' |')
  print(f'\nCompile time, wall s (CPU s), min of {args.compile_repeats}\n')
  print('| depth | ' + ' | '.join(kinds) + ' |')
  print('|---' * (len(kinds) + 1) + '|')
  for d in depths:
    print(f'| {d} | ' + ' | '.join(
        f'{results[k, d][1]:.2f} ({results[k, d][2]:.2f})' for k in kinds) + ' |')
  print(f'\nStep time (ms, median of {args.steps}; - = not run)\n')
  print('| depth | ' + ' | '.join(kinds) + ' |')
  print('|---' * (len(kinds) + 1) + '|')
  for d in depths:
    print(f'| {d} | ' + ' | '.join(
        '-' if results[k, d][3] is None else f'{results[k, d][3]:.0f}' for k in kinds) + ' |')


if __name__ == '__main__':
  main()
