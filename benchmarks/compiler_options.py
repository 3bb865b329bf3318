"""Training step with and without `terraflax.compiler`'s XLA options, A/B in one process.

Compiles the trainer's step for a row of benchmarks/train_throughput.py twice,
with `compiler.options()` and with XLA's defaults, checks that both give the
same loss, then times the two executables in turn (`--rounds` times each, after
one untimed call), so drifts in the machine's speed hit both alike. Prints
the medians, minima and tokens/s as a markdown table.

  python benchmarks/compiler_options.py --rows lsh4k,lsh16k --rounds 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from train_throughput import ROWS, load_average, training_setup  # noqa: E402  (benchmarks/ is the script's dir)


def measure(row: str, rounds: int, seed: int) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from terraflax import compiler  # pylint: disable=import-outside-toplevel
  from terraflax.train import trainer  # pylint: disable=import-outside-toplevel

  model, batch, tx, state, _ = training_setup(row, seed)
  step = trainer.make_train_step(model, tx)
  variants = {'terraflax.compiler.options()': compiler.options(), 'XLA defaults': {}}
  compiled = {name: jax.jit(step, compiler_options=options).lower(state, batch).compile()
              for name, options in variants.items()}
  losses = {name: float(c(state, batch)[1]['loss_sum']) for name, c in compiled.items()}
  first = next(iter(losses.values()))
  if not all(np.isclose(loss, first, rtol=1e-4) for loss in losses.values()):
    raise RuntimeError(f'{row}: the variants disagree on the loss: {losses}')
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, c in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(c(state, batch))
      times[name].append(time.perf_counter() - start)
  length = ROWS[row][1]
  return [{'row': row, 'variant': name, 'options': variants[name],
           'median': statistics.median(t), 'min': min(t), 'tokens_per_sec':
           length / statistics.median(t)} for name, t in times.items()]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', default='lsh4k', help=f'comma-separated subset of {",".join(ROWS)}')
  parser.add_argument('--rounds', type=int, default=8, help='timed calls of each variant')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rows = [r.strip() for r in args.rows.split(',') if r.strip()]
  bad = [r for r in rows if r not in ROWS]
  if bad:
    parser.error(f'--rows: unknown {bad}; valid: {",".join(ROWS)}')
  if args.rounds < 1:
    parser.error(f'--rounds must be >= 1, got {args.rounds}')

  print(f'# compiler_options: load average before: {load_average()}', flush=True)
  print('\n| row | compiled with | median step s | min step s | tok/s | speed-up |')
  print('|---|---|---|---|---|---|')
  for row in rows:
    results = measure(row, args.rounds, args.seed)
    base = results[-1]['median']
    for r in results:
      print(f"| {row} | {r['variant']} | {r['median']:.3f} | {r['min']:.3f} | "
            f"{r['tokens_per_sec']:.0f} | {base / r['median']:.2f}x |", flush=True)
  print(f'\nload average after: {load_average()}')


if __name__ == '__main__':
  main()
