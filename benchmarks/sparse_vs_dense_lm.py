"""A byte-level LM with SparseFF against its dense twin: loss curves after the same steps.

Trains the same model twice with the trainer (`python -m terraflax.train`),
on the same data (the default config's standard-library corpus) and seed,
once with SparseFF (`ff_sparsity`) and once with the dense feed-forward of
the same `d_ff` (`ff_sparsity=0`), then reads both `metrics.jsonl` files and
prints both curves and the final ratio. Issue 7 asks for the sparse model's
loss to be within 5% of the dense one's.

  python benchmarks/sparse_vs_dense_lm.py [--steps 300 --seq_len 128 --ff_sparsity 32]
  python benchmarks/sparse_vs_dense_lm.py --override model.attention.n_modules=2

Runs go to `--workdir/{dense,sparse}` and are started afresh (an old run
there is deleted) unless `--reuse` is given, which only re-reads them.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(args, name: str, ff_sparsity: int) -> float:
  """Runs one training to `args.steps`; returns its wall time in seconds."""
  workdir = os.path.join(args.workdir, name)
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  flags = {
      'model.ff_sparsity': ff_sparsity,
      'data.seq_len': args.seq_len,
      'train.steps': args.steps,
      'train.batch_size': args.batch_size,
      'train.log_every': args.log_every,
      'train.eval_every': args.eval_every,
      'train.eval_batches': args.eval_batches,
      'train.checkpoint_every': args.steps,
      'optimizer.warmup_steps': min(100, args.steps // 5),
      'sample.max_new_tokens': 0,
  }
  command = [sys.executable, '-m', 'terraflax.train', f'--config={args.config}',
             f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in flags.items()]
  command += [f'--config.{o}' for o in args.override]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
  if result.returncode:
    sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
    raise SystemExit(f'{name} training failed (exit {result.returncode}): {" ".join(command)}')
  return time.perf_counter() - start


def read_metrics(workdir: str) -> dict[int, dict]:
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row['step'], {}).update(row)
  return rows


def fmt(value) -> str:
  return '-' if value is None else f'{value:.4f}'


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'terraformer_lm.py'))
  parser.add_argument('--workdir', default='/tmp/sparse_vs_dense_lm')
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--ff_sparsity', type=int, default=32)
  parser.add_argument('--log_every', type=int, default=25)
  parser.add_argument('--eval_every', type=int, default=100)
  parser.add_argument('--eval_batches', type=int, default=32)
  parser.add_argument('--override', action='append', default=[],
                      help='extra config flag for both runs, e.g. model.reversible=False')
  parser.add_argument('--reuse', action='store_true', help='only re-read existing runs')
  args = parser.parse_args()

  runs = (('dense', 0), ('sparse', args.ff_sparsity))
  seconds = {}
  for name, ff_sparsity in runs:
    if not args.reuse:
      seconds[name] = train(args, name, ff_sparsity)
  metrics = {name: read_metrics(os.path.join(args.workdir, name)) for name, _ in runs}

  print(f'{os.path.relpath(args.config, ROOT)}, {args.steps} steps, batch {args.batch_size} x '
        f'{args.seq_len} bytes, same seed and data; sparse: ff_sparsity={args.ff_sparsity}; '
        f'dense: ff_sparsity=0' + (f'; overrides {args.override}' if args.override else ''))
  if seconds:
    print('wall time: ' + ', '.join(f'{n} {s:.0f} s' for n, s in seconds.items()))
  print('| step | dense train/loss | sparse train/loss | dense eval/loss | sparse eval/loss |')
  print('|---|---|---|---|---|')
  steps = sorted(set(metrics['dense']) | set(metrics['sparse']))
  for step in steps:
    d, s = metrics['dense'].get(step, {}), metrics['sparse'].get(step, {})
    print(f'| {step} | {fmt(d.get("train/loss"))} | {fmt(s.get("train/loss"))} | '
          f'{fmt(d.get("eval/loss"))} | {fmt(s.get("eval/loss"))} |')
  last = max(step for step in steps if 'eval/loss' in metrics['dense'].get(step, {}))
  dense, sparse = metrics['dense'][last]['eval/loss'], metrics['sparse'][last]['eval/loss']
  ratio = sparse / dense
  print(f'final eval/loss at step {last}: dense {dense:.4f}, sparse {sparse:.4f}, '
        f'sparse / dense = {ratio:.3f} ({"within" if ratio <= 1.05 else "NOT within"} 5%)')


if __name__ == '__main__':
  main()
