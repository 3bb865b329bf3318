"""Compile time of `Repeat(block, n)` against an unrolled `Serial` of n blocks.

Prints a markdown table. The scanned stack traces its block once, so its
compile time should stay flat as n grows (issue: n=24 within 2x of n=2).

  python benchmarks/repeat_compile.py [--depths 2,6,12,24]
"""

import argparse
import time

import jax
import jax.numpy as jnp

import terraflax.combinators as cb
import terraflax.layers as tl


def block(d_model: int, d_ff: int):
  return [
      cb.Residual(tl.LayerNorm(), tl.Dense(d_model), tl.Gelu(), tl.Dense(d_model)),
      cb.Residual(tl.FeedForward(d_model=d_model, d_ff=d_ff)),
  ]


def compile_seconds(model, x) -> float:
  """Seconds to lower and compile one training-style step (value and grad)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def loss(v):
    return jnp.mean(model.apply(v, x) ** 2)

  start = time.perf_counter()
  jax.jit(jax.value_and_grad(loss)).lower(variables).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--depths', default='2,6,12,24')
  parser.add_argument('--d_model', type=int, default=256)
  args = parser.parse_args()
  x = jnp.zeros((2, 128, args.d_model))
  rows, first = [], None
  for n in [int(d) for d in args.depths.split(',')]:
    repeat = compile_seconds(cb.Repeat(block(args.d_model, 4 * args.d_model), n), x)
    unrolled = compile_seconds(cb.Serial([block(args.d_model, 4 * args.d_model) for _ in range(n)]), x)
    first = first or repeat
    rows.append(f'| {n} | {repeat:.2f} | {repeat / first:.2f}x | {unrolled:.2f} |')
  print(f'jax {jax.__version__}, backend {jax.default_backend()}; value_and_grad of a block of '
        f'attention-free residual MLPs, d_model {args.d_model}')
  print('| depth | Repeat compile (s) | vs first depth | unrolled Serial compile (s) |')
  print('|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
